"""``bsbr convert``."""
from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

from ..numbers import MAX_RECALL_TOKENS, MAX_TOKENS, finite_number, integer

logger = logging.getLogger(__name__)


def gate_value(text: str):
    """``--gate-init``'s type, in every command that takes it: a float32-finite number, or ``none`` (no gate)."""
    return None if text.lower() == "none" else finite_number(float32=True)(text)


def check_default_window(chunk_size: int) -> None:
    """For a command that converts with the default window and has no ``--local-chunks`` (``demo``): refuse,
    before loading, a ``--chunk-size`` whose window would pass ``MAX_TOKENS``."""
    from ..errors import UserError
    from .defaults import DEFAULT_OPTIONS

    chunks = DEFAULT_OPTIONS["local_chunks"]
    if chunk_size * chunks > MAX_TOKENS:
        raise UserError(f"--chunk-size {chunk_size:,} must be at most {MAX_TOKENS // chunks:,} (the conversion's "
                        f"window is {chunks} chunks of at most {MAX_TOKENS:,} tokens in all)")


def add_conversion_arguments(p: argparse.ArgumentParser) -> None:
    """The conversion options, shared by every command that converts; defaults from the converter."""
    from .defaults import DEFAULT_CHUNK_SIZE, DEFAULT_OPTIONS as D

    p.add_argument("--chunk-size", type=integer(), default=DEFAULT_CHUNK_SIZE, help="tokens per chunk (default %(default)s)")
    p.add_argument("--local-chunks", type=integer(), default=D["local_chunks"],
                   help="chunks each token attends to exactly: its own and the LOCAL_CHUNKS - 1 before it "
                        "(default %(default)s)")
    p.add_argument("--sink-tokens", type=integer(0), default=D["sink_tokens"],
                   help="the sequence's first tokens kept in every exact window (attention sinks; default %(default)s)")
    p.add_argument("--retrieval-blocks", type=integer(0), default=None,
                   help="earlier chunks each token reads exactly, chosen per token by its query against each "
                        f"chunk's keys (its largest q.k; default {D['retrieval_blocks']}, 0 with --recall-tokens; 0 = none). "
                        "Keeps every past token's key and value: the cache grows with the context")
    p.add_argument("--recall-tokens", type=integer(0, MAX_RECALL_TOKENS), default=D["recall_tokens"],
                   help="the bounded recall mode (default %(default)s = off; sets --retrieval-blocks to 0 unless given): keep at "
                        "most M exact past tokens per layer and K/V head, those the linear state recalls worst "
                        "(near-duplicate values last), and the rest in one state; the cache stays constant (M tokens "
                        "per layer per K/V head plus the window), whatever the context length")
    p.add_argument("--far-positions", choices=["absolute", "window", "hybrid"], default=None,
                   help="rotary positions of sinks and retrieved blocks: 'window' (default) just before the window "
                        "(every distance short at any length); 'hybrid' their own within half the source's "
                        "max_position_embeddings, beyond as if in the oldest such chunk (lower perplexity past 8k, "
                        "but it missed 2 of 3 pass-keys at 16k on two held-out fillers that 'window' found); "
                        "'absolute' their own always (leaves the source's range past it)")
    p.add_argument("--retrieval", choices=["additive", "normalized"], default=D["retrieval"],
                   help="how the chunk states of unselected chunks join the softmax (default %(default)s)")
    p.add_argument("--feature-map", choices=["identity", "hedgehog"], default=None,
                   help=f"features of the chunk states (default {D['feature_map']}; identity with --retrieval additive; "
                        "--retrieval normalized needs hedgehog)")
    p.add_argument("--gate-init", type=gate_value, default=D["gate_init"],
                   help="initial chunk-state gate; 0 = closed (the source's attention over the exact keys until "
                        "trained; default), 'none' = no gate")
    def compression(text: str):
        return None if text.lower() == "none" else integer()(text)

    p.add_argument("--compression-factor", type=compression, default=None, metavar="N",
                   help="shrink each chunk state's feature dim by this factor, which must divide it (default: "
                        "none, as 'none' gives)")
    p.add_argument("--position-scheme", choices=["wrap", "clamp", "absolute"], default=None,
                   help=f"learned positions (GPT-2) past the source's table: {D['position_scheme']} (default) restarts them at a multiple "
                        "of the chunk size, clamp keeps the last one, absolute refuses longer inputs")


def conversion_options(args) -> dict:
    """The converter's keyword arguments from the parsed options."""
    from .defaults import DEFAULT_OPTIONS, resolve_options

    return dict(chunk_size=args.chunk_size, compression_factor=args.compression_factor,
                **resolve_options({name: getattr(args, name) for name in DEFAULT_OPTIONS}))


def check_conversion_options(options: dict) -> None:
    """Refuse bad options before loading the source (the converter would, but only after loading it),
    naming them as flags."""
    from ..arguments import as_flags
    from ..errors import UserError
    from ..models.bsbr.configuration_bsbr import check_bsbr_options

    try:
        check_bsbr_options(**options)
    except ValueError as e:
        raise UserError(as_flags(str(e), options)) from e


def _check_source_config(source, path: Path, options: dict) -> None:
    """Refuse options a local source's architecture does not take (a --compression-factor that does not
    divide its head size, an unsupported GPT-2 flag), from its config alone (a folder's config.json, a
    GGUF file's metadata), before its weights load."""
    from transformers import AutoConfig

    from ..arguments import as_flags
    from ..errors import UserError
    from .converter import TransformerToBSBRConverter

    try:
        config = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name) if path.suffix == ".gguf" and \
            path.is_file() else AutoConfig.from_pretrained(str(path), trust_remote_code=False)
    except Exception:  # a config transformers cannot read: loading the model says why
        return
    try:
        return TransformerToBSBRConverter(**options).bsbr_config(config).position_type
    except ValueError as e:
        raise UserError(f"SOURCE {source} cannot be converted: {as_flags(str(e), options)}") from e


def convert_source(source_model, options: dict, name: str):
    """``convert_to_bsbr(source_model, **options)``, a refusal as one line naming the source (``name``,
    "SOURCE DIR") and the options as flags: weights its config.json has no place for, or a
    ``--compression-factor`` its heads do not fit (a local folder's config.json is checked before loading)."""
    from ..arguments import as_flags
    from ..errors import UserError
    from .converter import convert_to_bsbr

    try:
        return convert_to_bsbr(source_model, **options)
    except ValueError as e:
        raise UserError(f"{name} cannot be converted: {as_flags(str(e), options)}") from e


def check_position_options(args, name: str, position_type: str) -> None:
    """Refuse a position option the source's kind of positions ignores (it would be recorded, doing nothing);
    ``name`` names the source ("SOURCE DIR")."""
    from ..errors import UserError

    if position_type == "learned":
        if args.far_positions is not None:
            raise UserError(f"--far-positions places rotary positions, but {name} has learned positions (GPT-2): "
                            "drop --far-positions")
    elif args.position_scheme is not None:  # (given, even as its default)
        raise UserError(f"--position-scheme applies to learned positions (GPT-2), but {name} has rotary "
                        "positions: drop --position-scheme")
    elif args.far_positions is not None:
        options = conversion_options(args)
        if not (options["sink_tokens"] or options["retrieval_blocks"] or options["recall_tokens"]):
            raise UserError("--far-positions places the sinks, retrieved blocks and recall cache, but this conversion "
                            "has none (--sink-tokens 0, --retrieval-blocks 0, no --recall-tokens): drop --far-positions")


def check_local_source(args, source, options: dict) -> None:
    """Before loading: a local folder's config.json names a family bsbr converts and fits the options
    (a ``--compression-factor`` its heads take, position flags its kind of positions reads); a GGUF file's
    (the bundled default's too) fits the options, when one that depends on the source is given (reading
    its metadata takes seconds, which a conversion that gives none does not pay)."""
    from ..arguments import read_config, source_label
    from ..errors import UserError
    from .defaults import default_source_path
    from .families import SUPPORTED_MODEL_TYPES

    try:
        local = default_source_path() if source is None else Path(str(source)).expanduser()
    except FileNotFoundError:  # (no bundled model: loading says how to install it)
        return
    if local.suffix == ".gguf" and local.is_file():
        if args.position_scheme is not None or args.far_positions is not None or args.compression_factor is not None:
            position_type = _check_source_config(source_label(source), local, options)
            if position_type is not None:
                check_position_options(args, f"SOURCE {source_label(source)}", position_type)
        return
    if not local.is_dir():
        return
    model_type = read_config(local / "config.json", "SOURCE")["model_type"]
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UserError(f"SOURCE {source} is a {model_type!r} model: bsbr converts "
                        f"{', '.join(SUPPORTED_MODEL_TYPES)} decoder LMs")
    position_type = _check_source_config(source, local, options)
    if position_type is not None:
        check_position_options(args, f"SOURCE {source}", position_type)


def cmd_convert(args) -> int:
    from ..arguments import check_default_model, check_model_arg
    from ..errors import OutputError, command_path
    from ..outputs import check_output_dir, config_model_type, output_lock
    from .families import SUPPORTED_MODEL_TYPES

    source, out = args.source, Path(args.output_dir)
    options = conversion_options(args)
    check_conversion_options(options)
    check_model_arg(source, "SOURCE")
    check_default_model(source, "SOURCE")
    check_local_source(args, source, options)
    # the lock from the start: a second command is refused at once (and its staging folder is not called a
    # leftover of a killed run)
    with output_lock(out, "OUTPUT_DIR", inputs=[("SOURCE", source)]):
        try:
            check_output_dir(out, overwrite=args.overwrite, inputs=[("SOURCE", source)], option="OUTPUT_DIR")
        except OutputError as e:
            # `bsbr convert victim ...`, SOURCE forgotten: suggested for a model it converts (not a BSBR one)
            if source is None and config_model_type(out / "config.json") in SUPPORTED_MODEL_TYPES:
                raise OutputError(f"{e} (OUTPUT_DIR {out} holds a model: did you mean `bsbr convert "
                                  f"{command_path(out)} NEW_DIR`?)") from e
            raise
        summary = _convert_and_save(args, source, out, options)
    print(f"parameters: {summary['params_source'] / 1e6:.2f}M -> {summary['params_bsbr'] / 1e6:.2f}M "
          f"(+{summary['extra_params_pct']:.2f}%), {summary['seconds']}s; saved to {out}")
    return 0


def _convert_and_save(args, source, out: Path, options: dict) -> dict:
    from ..arguments import check_tokenizer_fits, load_model_arg, load_tokenizer_arg
    from ..outputs import staged_dir, write_errors, write_failure

    t0 = time.perf_counter()
    # the tokenizer first: it is cheap, and a source without one is refused before any work
    tok = load_tokenizer_arg(source, "SOURCE")
    logger.info("loading %s", source or "the bundled SmolLM2-135M-Instruct (GGUF)")  # (progress: stderr)
    src = load_model_arg(source, "SOURCE", tokenizer=True)
    check_tokenizer_fits(tok, src.get_input_embeddings().weight.shape[0], f"SOURCE {source}")
    logger.info("converting (%s, %d layers)", src.config.model_type, src.config.num_hidden_layers)
    name = f"SOURCE {source or 'the bundled SmolLM2'}"
    model = convert_source(src, options, name)
    check_position_options(args, name, model.config.position_type)
    try:  # all or nothing
        with staged_dir(out, overwrite=args.overwrite) as tmp:
            return save_conversion(tmp, model, tok, source, src, options, time.perf_counter() - t0)
    except write_errors() as e:  # a full disk, a quota: nothing was published
        raise write_failure("OUTPUT_DIR", out, e, "the model") from e


def save_conversion(directory: Path, model, tokenizer, source, source_model, options: dict, seconds: float) -> dict:
    """Write a converted model as ``bsbr convert`` does: its weights and config, the tokenizer, the
    conversion record (``conversion.json``: the source by name, type and weights fingerprint, so later
    commands can check a reference or teacher against it; the options) and a model card. Returns the record."""
    from ..arguments import METADATA, hub_id, source_record
    from ..outputs import save_tokenizer, write_model_card

    from .. import __version__

    s = model.conversion_summary
    record = dict(bsbr_version=__version__, source=source_record(source, source_model),
                  source_model_type=s["source_model_type"], params_source=s["params_source"],
                  params_bsbr=s["params_bsbr"], extra_params_pct=round(s["extra_params_pct"], 3),
                  seconds=round(seconds, 1), **options)
    model.save_pretrained(directory)
    save_tokenizer(tokenizer, directory)
    (directory / METADATA).write_text(json.dumps(record, indent=2), encoding="utf-8")
    write_model_card(directory, hub_id(record["source"]["name"]))
    return record


def register(sub) -> None:
    p = sub.add_parser("convert", help="convert a pretrained decoder LM to BSBR")
    p.add_argument("source", nargs="?", default=None,
                   help="model directory, .gguf file or hub id (default: the bundled SmolLM2-135M-Instruct)")
    p.add_argument("output_dir", help="where to save the converted model (safetensors + config.json + tokenizer + "
                                      "conversion.json); must be new or empty")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty OUTPUT_DIR (once the new model "
                                                            "is completely written)")
    add_conversion_arguments(p)
    p.set_defaults(func=cmd_convert)
