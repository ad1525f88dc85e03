"""``bsbr demo``: the README's main job. Convert the default pretrained model to BSBR, evaluate it
against the original on the default corpus, measure speed side by side, print a summary table and
write JSON and plots."""
from __future__ import annotations

import time
from pathlib import Path

DECODE_STEPS = 16  # tokens decoded per context in the speed step


def cmd_demo(args) -> int:
    from .arguments import check_default_model, check_model_arg, check_unique
    from .convert.cli import check_default_window
    from .outputs import check_output_dir, out_of_room, output_lock, staged_dir, write_errors, write_failure

    final = Path(args.output)
    from .cli import not_utf8_path

    if why := not_utf8_path(args.output, output=True):  # (the default is no typed value, checked when parsed)
        from .errors import UserError

        raise UserError(f"--output {args.output} {why}")
    check_default_window(args.chunk_size)
    if args.seq_len < args.chunk_size + 2:  # the evaluation scores tokens past the first chunk
        from .errors import UserError

        raise UserError(f"--seq-len must be at least --chunk-size + 2 = {args.chunk_size + 2:,} so that some token "
                        f"past the first chunk has a target, got {args.seq_len:,}")
    check_unique("--speed-lens", args.speed_lens)
    check_unique("--decode-contexts", args.decode_contexts)
    check_model_arg(args.source, "--source")
    check_default_model(args.source, "--source")
    try:
        # everything lands in --output at the end, or nothing; not while another bsbr command writes there (the
        # lock first: its staging folder is not a leftover of a killed run)
        t0 = time.perf_counter()
        with output_lock(final, "--output", inputs=[("--source", args.source)]):
            check_output_dir(final, overwrite=args.overwrite, inputs=[("--source", args.source)], option="--output")
            with staged_dir(final, overwrite=args.overwrite) as out:
                _demo(args, out, final, t0)
    except write_errors() as e:
        if not (out_of_room(e) or _in_output(getattr(e, "filename", None), final)):
            raise
        raise write_failure("--output", final, e, "the demo's files") from e
    print(f"\nwrote {final}/eval.json, eval.png, speed.json, speed.png, model/ in {time.perf_counter() - t0:.0f}s")
    return 0


def _in_output(path, final: Path) -> bool:
    """Whether ``path`` (an error's file name) is ``final`` or in it, or the folder the demo stages it in."""
    from .outputs import resolved_path

    if not path:
        return False
    p, top = resolved_path(path), resolved_path(final)  # (as the output's folder was made: links before ..)
    return p.is_relative_to(top) or (p.is_relative_to(top.parent) and p != top.parent
                                     and p.relative_to(top.parent).parts[0].startswith(f".{top.name}."))


def _demo(args, out: Path, final: Path, t0: float) -> None:
    """The demo's work, its files written into ``out`` (published at ``final`` once it returns)."""
    import torch

    from .bench.common import torch_threads
    from .bench.converted import bench_converted, refuse_long_runs, speed_lines
    from .bench.defaults import DEFAULT_THREADS, MAX_SECONDS
    from .bench.plots import plot_converted
    from .results import write_json
    from .convert.cli import convert_source, save_conversion
    from .convert.defaults import resolve_options
    from .evaluate import evaluate_saved, summary_lines
    from .evaluate.saved import eval_windows
    from .evaluate.plots import plot_results
    from .evaluate.filler import default_fillers
    from .evaluate.passkey import check_prompt_lengths
    from .arguments import (check_model_tokenizer, check_positions, load_model_arg, load_tokenizer_arg,
                            source_label, source_name, warn_past_rotary_positions)

    print(f"[1/3] converting {args.source or 'SmolLM2-135M-Instruct (bundled GGUF)'} "
          f"to BSBR (chunk {args.chunk_size}) ...", flush=True)
    # one pass-key length, where the 8 default blocks cover half of the chunks before the window
    passkey = None if args.no_passkey else dict(lengths=[args.seq_len], depths=[0.1, 0.5, 0.9], trials=2, seed=0,
                                                max_new_tokens=8, fillers=default_fillers(2))
    tokenizer = load_tokenizer_arg(args.source, "--source")  # args.source is a path, a hub id or None
    check_model_tokenizer(tokenizer, args.source, "--source")
    if passkey is not None:
        check_prompt_lengths(tokenizer, "--seq-len", "give a longer --seq-len, or --no-passkey", **passkey)
    # the evaluation's windows before loading: a corpus too small for one is refused at once
    windows = eval_windows(tokenizer, seq_len=args.seq_len, max_windows=args.max_windows)
    source = load_model_arg(args.source, "--source", tokenizer=True)
    check_positions(source, "--source", [("--seq-len", args.seq_len)] + [("--speed-lens", n) for n in args.speed_lens]
                    + [(f"--decode-contexts (plus {DECODE_STEPS} decode steps)", n + DECODE_STEPS,
                        lambda table: f"give --decode-contexts at most {table - DECODE_STEPS:,}")
                       for n in args.decode_contexts])
    warn_past_rotary_positions(source, "--source", [("--seq-len", args.seq_len)])  # (its perplexity: no bound there)
    with torch_threads(DEFAULT_THREADS):  # (predicted at the speed step's thread count) a typo's length must not
        # start hours of the source's attention after the conversion and evaluation
        refuse_long_runs(source, args.speed_lens, args.decode_contexts, MAX_SECONDS, prefill_flag="--speed-lens",
                         budget_flag=None)
    options = dict(chunk_size=args.chunk_size, compression_factor=None, **resolve_options({}))
    model = convert_source(source, options, f"--source {source_label(args.source)}")
    model_dir = out / "model"
    model_dir.mkdir()
    save_conversion(model_dir, model, tokenizer, args.source, source, options, time.perf_counter() - t0)
    conv = model.conversion_summary
    print(f"      parameters {conv['params_source'] / 1e6:.1f}M -> {conv['params_bsbr'] / 1e6:.1f}M "
          f"(+{conv['extra_params_pct']:.2f}%); saved to {final / 'model'} (at the end)", flush=True)

    print(f"[2/3] evaluating against the original on {args.max_windows} held-out windows of {args.seq_len} "
          f"tokens of the Python standard library ...", flush=True)
    if passkey is not None:
        passkey["only"] = ["source", "window", "bsbr"]
    result = evaluate_saved(model_dir, args.source, seq_len=args.seq_len, max_windows=args.max_windows,
                            passkey=passkey, windows=windows)
    result["config"]["model_dir"] = str(final.resolve() / "model")  # where it lies once published (not staged)
    write_json(result, out / "eval.json")
    plot_results(result, out / "eval.png")

    print(f"[3/3] speed: converted vs original, side by side on {DEFAULT_THREADS} thread ...", flush=True)
    with torch_threads(DEFAULT_THREADS), torch.no_grad():  # as `bsbr bench converted`: ratios that hold beside
        # other jobs
        speed = bench_converted(source, model, args.speed_lens, repeats=args.repeats,
                                decode_contexts=args.decode_contexts, decode_steps=DECODE_STEPS)
    title = source_label(args.source)  # (a local source by absolute path in the JSON, as bench converted)
    speed["config"].update(model=source_name(args.source), gate_init=model.config.gate_init)
    write_json(speed, out / "speed.json")
    plot_converted(speed, out / "speed.png", title)

    print("\n=== summary ===")
    print("\n".join([*summary_lines(result), *speed_lines(speed)]))
    cfg = model.config
    print(f"Each token reads exactly its window (own chunk + {cfg.local_chunks - 1} before it + the first "
          f"{cfg.sink_tokens} tokens: the source restricted to it is the 'window' row) and the "
          f"{cfg.retrieval_blocks} earlier chunks its query scores highest; the chunk states' gates start closed and "
          "`bsbr distill` opens them (see docs/findings.md).")


def register(sub) -> None:
    from .convert.defaults import DEFAULT_CHUNK_SIZE
    from .numbers import MAX_REPEATS, integer

    p = sub.add_parser("demo", help="convert the default model, evaluate it against the original, show speed")
    p.add_argument("--source", default=None, help="model to convert (default: the bundled SmolLM2-135M-Instruct)")
    p.add_argument("--output", default="outputs/demo", help="new or empty directory for the model, JSON and plots "
                                                           "(default outputs/demo)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --output (once the demo is done)")
    p.add_argument("--chunk-size", type=integer(), default=DEFAULT_CHUNK_SIZE, help="tokens per chunk (default: "
                                                                                  "bsbr convert's, %(default)s)")
    p.add_argument("--seq-len", type=integer(), default=4096,
                   help="tokens per evaluation window and pass-key prompt (default %(default)s)")
    p.add_argument("--max-windows", type=integer(), default=2,
                   help="held-out windows of the standard library scored (default %(default)s)")
    p.add_argument("--no-passkey", action="store_true", help="skip the pass-key (6 prompts of --seq-len tokens "
                                                              "each for the source, the window alone and BSBR)")
    p.add_argument("--speed-lens", type=integer(), nargs="+", default=[1024, 4096],
                   help="prefill lengths timed side by side (default 1024 4096)")
    # a short context, and a long one within the source's 8,192 positions (with 16 decode steps), where BSBR's
    # step is faster (docs/findings.md, Speed)
    p.add_argument("--decode-contexts", type=integer(), nargs="*", default=[1024, 8000],
                   help=f"contexts to decode {DECODE_STEPS} tokens from, side by side (default 1024 8000; the flag "
                        "with no values: no decode)")
    p.add_argument("--repeats", type=integer(1, MAX_REPEATS), default=3,
                   help="timed runs per prefill length (default %(default)s)")
    p.set_defaults(func=cmd_demo)
