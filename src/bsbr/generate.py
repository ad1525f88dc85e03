"""``bsbr generate``: continue a prompt with a converted model."""
from __future__ import annotations

import errno
import logging
import time
from pathlib import Path
from typing import Optional

from .numbers import MAX_TOKENS, SEED_RANGE, counted, finite_number, integer

logger = logging.getLogger(__name__)

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

    from .errors import UserError
    from .arguments import check_text_files, not_utf8

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

    from .errors import UserError

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
    from .errors import UserError

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

    from .models import load_bsbr_model
    from .arguments import check_bsbr_dir, check_bsbr_positions, check_tokenizer_fits, load_tokenizer_arg, read_config

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
        from .corpus import leading_specials

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
            return f"give a prompt of at most {counted(table - args.max_new_tokens + 1, 'token')}"
        return f"give a shorter prompt and --max-new-tokens at most {table:,}"
    if n + args.max_new_tokens - 1 > MAX_TOKENS:  # (every other length option has this cap)
        raise UserError(f"{what} ({n:,} tokens) with --max-new-tokens {args.max_new_tokens:,} is longer than the "
                        f"{MAX_TOKENS:,} tokens bsbr reads in one sequence: {fix(MAX_TOKENS)}")
    check_bsbr_positions(path, "MODEL_DIR", [(f"{what} ({n:,} tokens) with --max-new-tokens {args.max_new_tokens:,}",
                                              n + args.max_new_tokens - 1, fix)])
    model = load_bsbr_model(path)
    check_tokenizer_fits(tok, model.config.vocab_size, f"MODEL_DIR {path}")
    from .evaluate.passkey import GREEDY

    # plain greedy (generation_config.json's beams and penalties left out, its stop strings kept), or sampling at
    # --temperature with the model's own settings (top-k, top-p, penalties) as generate() samples; one beam and one
    # text either way, and the prompt continued as given (token healing would rewrite its last tokens)
    # (the token ids, whatever generation_config.json says)
    how = dict(do_sample=True, temperature=args.temperature, num_beams=1, num_return_sequences=1, token_healing=False,
               return_dict_in_generate=False) if args.temperature > 0 else \
        dict(GREEDY, temperature=None, stop_strings=_stop_strings(model, tok, path))
    t0 = time.perf_counter()
    with torch.no_grad():  # (bsbr.cli.main gives a seeded run's caller its generator back)
        if args.seed is not None:
            torch.manual_seed(args.seed)
        try:
            out = model.generate(**ids, max_new_tokens=args.max_new_tokens, **how, tokenizer=tok,
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
