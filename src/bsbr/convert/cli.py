"""``bsbr convert`` and ``bsbr generate``."""
from __future__ import annotations

import argparse
import errno
import json
import logging
import time
from pathlib import Path
from typing import Optional

from ..numbers import MAX_RECALL_TOKENS, MAX_TOKENS, SEED_RANGE, finite_number, integer

logger = logging.getLogger(__name__)


def gate_value(text: str):
    """``--gate-init``'s type, in every command that takes it: a float32-finite number, or ``none`` (no gate)."""
    return None if text.lower() == "none" else finite_number(float32=True)(text)


def check_default_window(chunk_size: int) -> None:
    """For commands that convert with the default window and have no ``--local-chunks`` (``demo``, ``bench
    converted``): refuse, before loading, a ``--chunk-size`` whose window would pass ``MAX_TOKENS``."""
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
    src = load_model_arg(source, "SOURCE")
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


MIN_TEMPERATURE = 1e-6  # logits / temperature stay finite in float32 (1e-39 overflowed to inf)


def _mode(path) -> int:
    """``path``'s file mode (0 if it cannot be read)."""
    import os

    try:
        return os.stat(path).st_mode
    except (OSError, ValueError):
        return 0


def _prompt_text(args) -> str:
    """The prompt: ``--prompt``, or the UTF-8 text of ``--prompt-file`` (``-``: standard input; a pipe)."""
    import os
    import stat
    import sys

    from ..errors import UserError
    from ..arguments import check_text_files, not_utf8

    if args.prompt is not None:
        text = args.prompt
        try:  # bytes that are not UTF-8 reach argv as lone surrogates, which no tokenizer takes
            text.encode("utf-8")
        except UnicodeEncodeError:
            try:  # (a locale that is not UTF-8 decodes argv by its own codec: the bytes may still be UTF-8)
                return os.fsencode(text).decode("utf-8")
            except (UnicodeEncodeError, UnicodeDecodeError):
                raise UserError("--prompt is not UTF-8 text: give the prompt in UTF-8") from None
        return text
    # a pipe (/dev/stdin, <(...)) is read once, as "-" reads standard input
    piped = args.prompt_file == "-" or stat.S_ISFIFO(_mode(args.prompt_file))
    if not piped:
        check_text_files([args.prompt_file], option="--prompt-file")
    if args.prompt_file == "-" and sys.stdin is None:  # (started with standard input closed)
        raise UserError("--prompt-file -: standard input is closed: pipe the prompt in, or give --prompt or a file")
    data = Path(args.prompt_file).read_bytes() if args.prompt_file != "-" else sys.stdin.buffer.read()
    why = not_utf8(data) if piped else None  # (a file's bytes were checked above)
    if why:
        raise UserError(f"--prompt-file {'- (standard input)' if args.prompt_file == '-' else args.prompt_file} {why}")
    try:  # the same text from a file or a pipe: no byte-order mark, newlines as \n (as the corpus reads text)
        return data.decode("utf-8-sig").replace("\r\n", "\n").replace("\r", "\n")
    except UnicodeDecodeError as e:
        at = e.start + (3 if data.startswith(b"\xef\xbb\xbf") else 0)  # (counted after the byte-order mark)
        name = "- (standard input)" if args.prompt_file == "-" else args.prompt_file  # (a file: a cut byte-order mark)
        raise UserError(f"--prompt-file {name} is not UTF-8 text ({e.reason} at byte {at:,}): "
                        "give UTF-8 text") from None


# generation_config.json's token ids (or lists of them) that generate() reads from one prompt: below the vocabulary
# (an eos past it never stops generation, a forced one is an IndexError); pad and bos, never read here, only ints
# (early Llama checkpoints ship pad -1, which transformers takes)
_TOKEN_FIELDS = ("eos_token_id", "forced_bos_token_id", "forced_eos_token_id", "suppress_tokens",
                 "begin_suppress_tokens")


def _check_generation_config(path: Path, vocab: Optional[int] = None) -> None:
    """MODEL_DIR's ``generation_config.json``, if any, must load and hold values generate() takes (token ids
    below ``vocab``, the model's): transformers reads an unreadable one as defaults without a word, and fails deep
    in generate() on a wrong one."""
    from transformers import GenerationConfig

    from ..errors import UserError

    file = path / "generation_config.json"
    if not file.is_file():
        return
    if not (isinstance(vocab, int) and not isinstance(vocab, bool) and vocab > 0):
        vocab = None  # (a bad vocab_size is refused where the model loads)
    try:
        config = GenerationConfig.from_pretrained(str(path))  # (raises on some values itself)
        config.validate()  # (raises on values generate() refuses; minor issues are only logged)
        for name in (*_TOKEN_FIELDS, "pad_token_id", "bos_token_id"):
            value, top = getattr(config, name, None), vocab if name in _TOKEN_FIELDS else None
            ids = value if isinstance(value, list) else [value]
            if not all(i is None or isinstance(i, int) and not isinstance(i, bool) and (top is None or 0 <= i < top)
                       for i in ids):
                raise ValueError(f"{name} must be a token id{'' if top is None else f' below {top:,} (the vocabulary)'}"
                                 f" or a list of them, got {value!r}")
        if config.num_beams is not None and not (isinstance(config.num_beams, int) and config.num_beams >= 1):
            raise ValueError(f"num_beams must be an int >= 1, got {config.num_beams!r}")
        # modes transformers' generate() no longer runs itself (custom_generate code), which bsbr never loads
        for name, off in (("num_beam_groups", (None, 1)), ("diversity_penalty", (None, 0.0)), ("dola_layers", (None,)),
                          ("low_memory", (None, False))):
            if getattr(config, name, None) not in off:
                raise ValueError(f"{name} {getattr(config, name)!r} asks for a decoding mode bsbr generate does "
                                 "not run")
    except Exception as e:  # (any: transformers raises several kinds)
        raise UserError(f"MODEL_DIR {path}: {file.name} cannot be used ({' '.join(str(e).split())[:200]}): fix or "
                        "delete it") from None


def _raised_by_generation(e: BaseException) -> bool:
    """Whether ``e`` was raised by transformers' generation code (its decoding settings), not by the model."""
    tb, where = e.__traceback__, ""
    while tb is not None:
        where, tb = tb.tb_frame.f_code.co_filename, tb.tb_next
    return Path(where).parent.name == "generation" and Path(where).parent.parent.name == "transformers"


def _stop_strings(model, tok, path):
    """generation_config.json's stop strings where this tokenizer can stop on them (transformers cannot for every
    kind of tokenizer: then a warning, and none)."""
    stops = getattr(model.generation_config, "stop_strings", None)
    if not stops:
        return None
    try:
        from transformers.generation.stopping_criteria import StopStringCriteria

        StopStringCriteria(tok, stops)
    except Exception as e:
        logger.warning("MODEL_DIR %s: generation_config.json's stop_strings are not applied: its tokenizer cannot stop "
                       "on them (%s)", path, " ".join(str(e).split())[:120])
        return None
    return stops


def cmd_generate(args) -> int:
    from ..errors import UserError

    prompt = _prompt_text(args)
    what = "--prompt" if args.prompt is not None else "--prompt-file"
    if not prompt.strip():  # (a chat template or a tokenizer's BOS would still give tokens to generate from)
        raise UserError(f"{what} gives no text: give some text to continue")
    if not (args.temperature == 0 or MIN_TEMPERATURE <= args.temperature < float("inf")):
        raise UserError(f"--temperature must be 0 (greedy) or a finite number >= {MIN_TEMPERATURE:g} (logits divided "
                        f"by less overflow float32), got {args.temperature}")
    if args.seed is not None and args.temperature == 0:
        raise UserError("--seed seeds the sampling, and --temperature 0 is greedy (no sampling): give --temperature "
                        "above 0, or drop --seed")
    import torch

    from ..models import load_bsbr_model
    from ..arguments import check_bsbr_dir, check_bsbr_positions, check_tokenizer_fits, load_tokenizer_arg, read_config

    path = check_bsbr_dir(args.model_dir, "MODEL_DIR")
    _check_generation_config(path, read_config(path / "config.json", "MODEL_DIR").get("vocab_size"))
    tok = load_tokenizer_arg(path, "MODEL_DIR")
    if args.chat:  # one user message in the model's chat template, the assistant's turn opened
        if not getattr(tok, "chat_template", None):
            raise UserError(f"--chat: the tokenizer in MODEL_DIR {path} has no chat template: drop --chat")
        if args.prompt is None:  # a file's (or a pipe's) final newline ends the file, not the message
            prompt = prompt.removesuffix("\n")
        try:
            ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                          return_tensors="pt", return_dict=True)
        except Exception as e:  # (a template is code: jinja2's errors, or any its expressions raise)
            raise UserError(f"--chat: the chat template in MODEL_DIR {path} fails ({type(e).__name__}: "
                            f"{' '.join(str(e).split())[:160]}): fix it, or drop --chat") from None
    else:  # the text after the specials the tokenizer puts first (a BOS), not those it appends (an EOS would end
        # the text before its continuation)
        from ..corpus import leading_specials

        prompt_ids = leading_specials(tok) + list(tok(prompt, add_special_tokens=False)["input_ids"])
        ids = dict(input_ids=torch.tensor([prompt_ids]),
                   attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.int64))
    ids = {k: v for k, v in ids.items() if k in ("input_ids", "attention_mask")}
    n = ids["input_ids"].shape[1]
    if n == 0 and args.chat:  # (the prompt has text: the template dropped it)
        raise UserError(f"the chat template in MODEL_DIR {path} renders no tokens for the {what} message: fix the "
                        "template, or drop --chat")
    if n == 0:
        raise UserError(f"{what} gives no tokens: give some text to continue")
    # the prompt and every new token but the last are fed to the model
    def fix(table: int) -> str:
        if n <= table:
            return f"give --max-new-tokens at most {table - n + 1:,}"
        if args.max_new_tokens <= table:
            return f"give a prompt of at most {table - args.max_new_tokens + 1:,} tokens"
        return f"give a shorter prompt and --max-new-tokens at most {table:,}"
    if n + args.max_new_tokens - 1 > MAX_TOKENS:  # (every other length option has this cap)
        raise UserError(f"{what} ({n:,} tokens) with --max-new-tokens {args.max_new_tokens:,} is longer than the "
                        f"{MAX_TOKENS:,} tokens bsbr reads in one sequence: {fix(MAX_TOKENS)}")
    check_bsbr_positions(path, "MODEL_DIR", [(f"{what} ({n:,} tokens) with --max-new-tokens {args.max_new_tokens:,}",
                                              n + args.max_new_tokens - 1, fix)])
    model = load_bsbr_model(path)
    check_tokenizer_fits(tok, model.config.vocab_size, f"MODEL_DIR {path}")
    from ..evaluate.passkey import GREEDY

    # plain greedy (generation_config.json's beams and penalties left out, its stop strings kept), or sampling at
    # --temperature with the model's own settings (top-k, top-p, penalties) as generate() samples; one beam and one
    # text either way, and the prompt continued as given (token healing would rewrite its last tokens)
    how = dict(do_sample=True, temperature=args.temperature, num_beams=1, num_return_sequences=1, token_healing=False) \
        if args.temperature > 0 else dict(GREEDY, temperature=None, stop_strings=_stop_strings(model, tok, path))
    t0 = time.perf_counter()
    with torch.no_grad():  # (bsbr.cli.main gives a seeded run's caller its generator back)
        if args.seed is not None:
            torch.manual_seed(args.seed)
        try:
            out = model.generate(**ids, max_new_tokens=args.max_new_tokens, **how, tokenizer=tok,
                                 return_dict_in_generate=False,  # (whatever generation_config.json says)
                                 pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
        except (ValueError, TypeError) as e:  # a value of generation_config.json's that transformers checks only here
            if not ((path / "generation_config.json").is_file() and _raised_by_generation(e)):
                raise
            why = " ".join(str(e).split())[:200]
            raise UserError(f"MODEL_DIR {path}: generation_config.json cannot be used ({why}): fix or delete "
                            "it") from None
    dt = time.perf_counter() - t0
    new = out[0, n:]
    if args.chat:  # the reply alone
        text = tok.decode(new, skip_special_tokens=True)
    else:  # the continuation as the whole text decodes it (a piece decoded alone may lose its leading space),
        # after a command line's prompt as given (a file's prompt is not printed)
        whole, head = (tok.decode(x, skip_special_tokens=True) for x in (out[0], out[0, :n]))
        if whole.startswith(head):
            text = (args.prompt or "") + whole[len(head):]  # (as given: a locale's stdout writes its bytes back)
        else:
            text = whole if args.prompt is not None else tok.decode(new, skip_special_tokens=True)
    import sys

    try:
        print(text)
        if callable(flush := getattr(sys.stdout, "flush", None)):  # (here: a full disk is named now, not at exit;
            flush()  # a caller's stdout may have no flush)
    except UnicodeEncodeError:
        raise UserError(f"stdout: its encoding ({sys.stdout.encoding}) cannot write the generated text: set "
                        "PYTHONIOENCODING=utf-8 (or a UTF-8 locale)") from None
    except OSError as e:
        if isinstance(e, BrokenPipeError):
            raise
        room = " with room" if e.errno in (errno.ENOSPC, errno.EDQUOT) else ""
        raise UserError(f"stdout: {e.strerror or e}: the generated text could not be written there: give a file"
                        f"{room} or a pipe") from e
    logger.info("%d prompt tokens, %d new tokens in %.2fs (%.1f tokens/s)", n, len(new), dt, len(new) / max(dt, 1e-9))
    return 0


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

    g = sub.add_parser("generate", help="generate text with a converted model")
    g.add_argument("model_dir", help="a BSBR model directory (bsbr convert's or distill's output)")
    given = g.add_mutually_exclusive_group(required=True)
    given.add_argument("--prompt", help="the text to continue; printed with its continuation")
    given.add_argument("--prompt-file", metavar="FILE", help="read the prompt from this UTF-8 file (- : standard "
                                                             "input), as for a long document; only the continuation "
                                                             "is printed")
    g.add_argument("--chat", action="store_true", help="the prompt is one user message in the model's chat template "
                                                       "(instruct models); only the reply is printed")
    g.add_argument("--max-new-tokens", type=integer(), default=64, help="tokens to generate (default 64)")
    g.add_argument("--temperature", type=finite_number(), default=0.0,
                   help="0 = greedy (default: the likeliest token each step; generation_config.json's beams and "
                        "penalties are not applied, its stop strings are); above 0, sampling at this temperature "
                        "with the model's own generation settings (top-k, top-p, penalties), as generate() samples")
    g.add_argument("--seed", type=integer(*SEED_RANGE), default=None,
                   help="the sampling's seed: the same seed, model and prompt give the same text (default: none, "
                        "each run samples anew)")
    g.set_defaults(func=cmd_generate)
