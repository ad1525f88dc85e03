"""The ``bsbr`` command. A subcommand's module (:data:`COMMANDS`) is imported only when the command is
chosen or its ``--help`` asked, so ``bsbr --help`` imports neither torch nor transformers. :func:`main` is
the one error boundary: a failure is one line ``bsbr <command>: error: <what> (<what to do>)`` on stderr,
or with ``-v`` the traceback.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import logging
import os
import re
import signal
import sys
import threading
import traceback
import warnings
from typing import Optional

from .errors import INTERRUPTED
from .notes import occasion

# name -> (help, module whose register(sub) defines it)
COMMANDS = {
    "demo": ("convert the default model, evaluate it against the original, show speed", "bsbr.demo"),
    "convert": ("convert a pretrained decoder LM to BSBR", "bsbr.convert.cli"),
    "generate": ("generate text with a converted model", "bsbr.generate"),
    "distill": ("recover a converted model's quality from its source", "bsbr.distill.cli"),
    "bench": ("benchmarks: speed and memory, side by side, JSON + PNG", "bsbr.bench.cli"),
    "eval": ("evaluate a converted model against its source, chunk-local attention and its window alone", "bsbr.evaluate.cli"),
}

EXIT_INTERNAL, EXIT_USAGE, EXIT_INTERRUPTED, EXIT_PIPE = 1, 2, 130, 141

EXIT_CODES = """exit status:
  0    done
  1    internal error (a bug): rerun with -v and report the traceback
  2    bad usage or refused input: the one-line message names the argument or file and what to do
       (e.g. a non-empty output without --overwrite, a reference/teacher that is not the source
       without --force, a partial or mismatched checkpoint)
  130  interrupted (Ctrl-C / SIGTERM); bsbr distill first writes a checkpoint and prints the
       command that resumes it
  141  the reader of the output went away (`bsbr generate ... | head`), quietly"""


# the values that name a model or output folder, whose files the tokenizers and safetensors libraries read or write:
# their code takes UTF-8 paths alone
_FOLDERS = frozenset({"model", "model_dir", "output_dir", "source", "output", "reference", "student", "teacher"})


def not_utf8_path(value: str, output: bool) -> Optional[str]:
    """Why the folder ``value`` cannot be given to the tokenizers and safetensors libraries (bytes this locale could
    not decode: lone surrogates), or None: an ``output`` one as its real path, ``~``, the working directory's name
    and links resolved (the commands write there by it); an input one as given, ``~`` expanded (read by it)."""
    try:
        path = os.path.realpath(os.path.expanduser(value)) if output else os.path.expanduser(value)
    except FileNotFoundError:  # (a relative output in a working directory since removed)
        return "cannot be placed: the working directory no longer exists: cd to one that does"
    try:
        path.encode("utf-8")
        return None
    except UnicodeEncodeError:
        pass
    try:  # UTF-8 bytes, decoded by an ASCII locale without Python's UTF-8 mode
        os.fsencode(path).decode("utf-8")
        return "holds characters this locale cannot read: run in a UTF-8 locale, or with PYTHONUTF8=1"
    except UnicodeDecodeError:
        return ("is not UTF-8 text (its path, the working directory's included): the tokenizers and safetensors "
                "libraries read UTF-8 paths alone: rename it (or the folder it lies in) in UTF-8")


class _StoreOnce(argparse._StoreAction):
    """argparse's ``store``, except that an option may not be given twice (argparse would keep the last value
    and silently drop the first: ``--text-file a --text-file b`` read only b, ``--prompt a --prompt b``
    answered b alone), and no value may be the empty string (``Path("")`` is the current directory)."""

    def __call__(self, parser, namespace, values, option_string=None):
        given = getattr(parser, "given", set())  # (Parser's: the options of the command line it parses)
        if option_string and self.dest in given:
            raise argparse.ArgumentError(self, "given twice: one dataset is read (put its files in one folder)"
                                         if self.dest == "dataset" else
                                         f"given twice: give all its values after one {option_string}"
                                         if self.nargs in ("+", "*") else "given twice: give it once")
        given.add(self.dest)
        if any(isinstance(v, str) and not v.strip() for v in (values if isinstance(values, list) else [values])):
            raise argparse.ArgumentError(self, "is empty: give a value")
        if self.dest in _FOLDERS and isinstance(values, str) and (why := not_utf8_path(
                values, output=self.dest in ("output_dir", "output"))):
            raise argparse.ArgumentError(self, why)  # (it failed at the end of a run: distill after training)
        if self.nargs in (None, "?") and isinstance(values, list):  # (argparse 3.11 turns a second `--` into [])
            raise argparse.ArgumentError(self, f"got {' '.join(values) or 'a second --'}: give one value")
        super().__call__(parser, namespace, values, option_string)


class _OnOffOnce(argparse.BooleanOptionalAction):
    """argparse's ``--x/--no-x`` pair, except that the two may not both be given (the later one won silently)."""

    def __call__(self, parser, namespace, values, option_string=None):
        given = getattr(parser, "given", set())
        if option_string and self.dest in given:
            raise argparse.ArgumentError(self, "given twice: give one of its forms once")
        given.add(self.dest)
        super().__call__(parser, namespace, values, option_string)


class Parser(argparse.ArgumentParser):
    """An argparse parser whose usage errors are one line (exit status 2), which refuses an option that
    takes a value, or both forms of an on/off flag, given twice, which reads a negative number in exponent
    form (``--gate-init -1e39``) as a value, as argparse reads ``-0.5``, and which takes options by their
    whole names only (an abbreviation such as ``--overw`` would be echoed into printed commands, and change
    meaning when an option is added)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)
        self._negative_number_matcher = re.compile(r"^-(\d+\.?\d*|\.\d+)(e[-+]?\d+)?$", re.IGNORECASE)
        for name in (None, "store"):
            self.register("action", name, _StoreOnce)

    def add_argument(self, *args, **kwargs):
        if kwargs.get("action") is argparse.BooleanOptionalAction:
            kwargs["action"] = _OnOffOnce
        return super().add_argument(*args, **kwargs)

    def _parse_known_args(self, *args, **kwargs):
        self.given = set()  # the destinations of the options given so far (_StoreOnce)
        return super()._parse_known_args(*args, **kwargs)

    def error(self, message):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


class LazyParser(Parser):
    """A subcommand parser whose arguments are added on first use by ``register(sub)`` of ``module``."""

    def __init__(self, *args, module: str, **kwargs):
        super().__init__(*args, **kwargs)
        self._module = module  # None once loaded

    def _load(self) -> None:
        if self._module:
            module, self._module = self._module, None
            importlib.import_module(module).register(_Subparsers(self))

    def parse_known_args(self, args=None, namespace=None):
        self._load()
        return super().parse_known_args(args, namespace)

    def format_help(self):  # format_usage needs no hook: Parser.error prints no usage
        self._load()
        return super().format_help()


class _Subparsers:
    """What a module's ``register(sub)`` sees: ``add_parser(NAME, ...)`` returns the lazy parser of the
    chosen command; the module's other commands go to a parser that is thrown away."""

    def __init__(self, parser: LazyParser):
        self.parser = parser
        self.name = parser.prog.rsplit(" ", 1)[-1]

    def add_parser(self, name, **kwargs):
        if name != self.name:
            return Parser(prog=name, add_help=False)
        for key in kwargs.keys() & {"description", "epilog", "formatter_class"}:
            setattr(self.parser, key, kwargs[key])
        return self.parser


def add_lazy_commands(sub, commands: dict) -> None:
    """Add each ``name -> (help, module)`` of ``commands`` to the subparsers ``sub`` as a :class:`LazyParser`."""
    for name, (help_text, module) in commands.items():
        p = sub.add_parser(name, help=help_text, description=help_text, module=module)
        # -v also after the command (bsbr convert ... -v); SUPPRESS keeps a top-level -v
        p.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                       help="debug logging, and the traceback of an error")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__  # bsbr/__init__ is light: no torch

    parser = Parser(prog="bsbr", description="Block Sparse attention with Block Retrieval", epilog=EXIT_CODES,
                    formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging, and the traceback of an error")
    parser.add_argument("--version", action="version", version=f"bsbr {__version__}")
    parser.commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=LazyParser)
    add_lazy_commands(parser.commands, COMMANDS)
    return parser


def _one_line(e: BaseException) -> str:
    """The exception's message on one line (an OSError as ``FILE: what went wrong``)."""
    if isinstance(e, OSError) and e.filename and e.strerror:
        return f"{e.filename}: {e.strerror}"
    return " ".join(str(e).split()) or type(e).__name__


def _terminal(stream) -> bool:
    """Whether ``stream`` is a terminal (False for None, a closed one, or a writer without ``isatty``: a tee)."""
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):
        return False


def _interrupt(signum, frame):
    INTERRUPTED.set()  # remembered, should a library swallow the exception (bsbr.errors.check_not_interrupted)
    raise KeyboardInterrupt


def main(argv=None) -> int:
    """Run ``bsbr ARGV``; returns the exit status. A Ctrl-C, or SIGTERM, while this runs is status 130 and
    one line, and nothing is published after it, whatever it interrupted (a command may handle it itself
    meanwhile, as distill does during training)."""
    ours = []
    if threading.current_thread() is threading.main_thread():
        INTERRUPTED.clear()
        for sig, default in ((signal.SIGINT, signal.default_int_handler), (signal.SIGTERM, signal.SIG_DFL)):
            if signal.getsignal(sig) == default:
                signal.signal(sig, _interrupt)
                ours.append((sig, default))
    hook = sys.unraisablehook
    if ours:  # a Ctrl-C inside a finalizer is only printed, as a traceback: INTERRUPTED keeps it, said in one line
        sys.unraisablehook = lambda u: None if issubclass(u.exc_type, KeyboardInterrupt) and INTERRUPTED.is_set() \
            else hook(u)
    stderr = sys.stderr
    if stderr is None:  # started with stderr closed (2>&-): what the command says goes nowhere
        sys.stderr = open(os.devnull, "w")
    try:
        return _main(argv)
    finally:
        if stderr is None:
            sys.stderr.close()
            sys.stderr = None
        if ours:
            sys.unraisablehook = hook
        for sig, default in ours:
            signal.signal(sig, default)
        if ours:  # this call's interrupt ends with it (later writes in the process, another thread's command)
            INTERRUPTED.clear()


def run() -> None:
    """The console command: :func:`main`, then exit with its status. A Ctrl-C or SIGTERM during the
    interpreter's shutdown (a second or so after the command is done) does not turn a finished command into
    130 or 143. Into a log (stderr not a terminal) no library draws a progress bar either: tqdm reads
    ``TQDM_DISABLE`` when it is imported (transformers' GGUF loader has no switch of its own)."""
    if not _terminal(sys.stderr):
        os.environ.setdefault("TQDM_DISABLE", "1")
    code = main()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if _STDOUT_LOST.is_set():  # (the exit's flush of what could not be written goes nowhere, quietly)
        with contextlib.suppress(OSError, ValueError, AttributeError, io.UnsupportedOperation):
            _to_devnull(sys.stdout.fileno())
    sys.exit(code)


# a write to stdout failed (its reader went away, a full disk): the console command's exit points it at /dev/null;
# a program that called main() keeps its own descriptor
_STDOUT_LOST = threading.Event()


def _to_devnull(fd: int) -> None:
    """Point ``fd`` at /dev/null (what is still written to a closed pipe goes nowhere)."""
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, fd)
    finally:
        os.close(null)  # (kept, one descriptor leaked per command in a process that runs many)


class _ClosedPipeIgnored:
    """stdout for a command that writes files: once it cannot be written (its reader has gone: ``| head``,
    ``| true``; a full device; closed from the start: ``>&-``), what the command prints is dropped and it goes
    on, so the files it was asked for are still written. ``stop``: its printing is its work (results asked for
    no file): it stops instead, status 141 when the reader went away, else one line naming stdout
    (``bsbr generate`` is not wrapped: the same)."""

    def __init__(self, stream, stop: bool = False):
        self._stream = open(os.devnull, "w") if stream is None else stream
        self.failed: Optional[OSError] = None  # a write that failed otherwise than by a closed pipe (a full disk)
        self.stop = stop

    def _closed(self):
        _STDOUT_LOST.set()
        self._stream = open(os.devnull, "w")

    def write(self, text):
        try:
            return self._stream.write(text)
        except OSError as e:
            self._lost(e)
            return len(text)
        except UnicodeEncodeError as e:  # a file's name its encoding lacks (PYTHONIOENCODING=ascii): escaped
            self.write(text.encode(e.encoding, "backslashreplace").decode(e.encoding))
            return len(text)

    def flush(self):
        try:
            if callable(flush := getattr(self._stream, "flush", None)):
                flush()
        except OSError as e:
            self._lost(e)

    def _lost(self, error: OSError) -> None:
        """What cannot be printed is dropped; a failure other than a closed pipe is kept, to be reported."""
        if not isinstance(error, BrokenPipeError):
            self.failed = self.failed or error
        self._closed()
        if self.stop:
            from .errors import UserError

            raise error if self.failed is None else UserError(f"stdout: {error.strerror or error}: what the command "
                                                              "printed is lost")

    def __getattr__(self, name):
        return getattr(self._stream, name)


def _interrupted(name: str) -> int:
    print(f"bsbr{' ' + name if name else ''}: interrupted", file=sys.stderr)
    return EXIT_INTERRUPTED


# the options naming files or directories (a hub id never starts with ~; --passkey-filler's type expands its
# value while parsing, as it reads the file then)
PATH_OPTIONS = ("source", "model", "model_dir", "output_dir", "output", "student", "teacher", "reference", "text_file",
                "json", "plot", "passkey_plot", "lm_eval_task_dir", "prompt_file", "earlier_wheel", "corpus", "merge",
                "dataset")


def _expand_home(args) -> None:
    """``~`` at the start of a path option, expanded once for every check and write (``--output=~/x`` and
    a quoted ``"~/x"`` reach the command unexpanded; checking one folder and writing another lost files)."""
    from .arguments import expand_home as expand

    for name in PATH_OPTIONS:
        value = getattr(args, name, None)
        if value is not None:
            setattr(args, name, [expand(v) for v in value] if isinstance(value, list) else expand(value))


def _convert_intermixed(parser, args, argv):
    """``bsbr convert SOURCE --opt X OUTPUT_DIR``: argparse fills the two positionals from their first run (SOURCE
    is optional), so it reads SOURCE as OUTPUT_DIR and OUTPUT_DIR as unrecognized; parsed again, options first,
    then the positionals together (``parse_known_intermixed_args``)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    at = next(i for i, a in enumerate(argv) if a == "convert")  # (only -v and --version come before the command)
    top = {k: v for k, v in vars(args).items() if k in ("command", "verbose")}
    return parser.commands.choices["convert"].parse_known_intermixed_args(argv[at + 1:], argparse.Namespace(**top))


def _main(argv) -> int:
    try:
        parser = build_parser()
        args, extra = parser.parse_known_args(argv)
        if getattr(args, "command", None) == "convert" and args.source is None and extra:
            args, extra = _convert_intermixed(parser, args, argv)
        if extra:  # named by the (sub)command they were given to, as its other usage errors are
            command = parser
            while getattr(command, "commands", None) and getattr(args, command.commands.dest, None):
                command = command.commands.choices[getattr(args, command.commands.dest)]
            command.error(f"unrecognized arguments: {' '.join(extra)}")
    except SystemExit as e:  # argparse: --help (0) or a usage error (2, already printed as one line)
        return _interrupted("") if INTERRUPTED.is_set() else int(e.code or 0)
    except KeyboardInterrupt:  # Ctrl-C while a subcommand's parser imports its modules
        return _interrupted("")
    except Exception:  # (an import interrupted midway can fail as another error)
        if not INTERRUPTED.is_set():
            raise
        return _interrupted("")
    try:
        args.argv = list(sys.argv[1:] if argv is None else argv)
        _expand_home(args)
        verbose = bool(getattr(args, "verbose", False))
        no_bars = bool(getattr(args, "no_progress", False)) or not _terminal(sys.stderr)  # none in a log, or asked
        with _command_settings(verbose, no_bars, _rank(args)), _generator_kept(args), _grad_as_in_a_process(), \
                occasion():  # (each run says its notes, as in a process of its own)
            return _run_main(parser, args, verbose, no_bars)
    except KeyboardInterrupt:  # Ctrl-C while the command's settings are made or given back (its run handles its own)
        return _interrupted(" ".join(filter(None, [args.command, getattr(args, "bench_command", None)])))


_ENV = ("TRANSFORMERS_VERBOSITY", "DATASETS_VERBOSITY", "HF_HUB_OFFLINE")


_SEEDED = threading.Lock()  # commands that seed torch's generator, run in threads, take turns: they share it


@contextlib.contextmanager
def _generator_kept(args):
    """A command that seeds torch's generator (distill, bench, demo, generate --seed) gives the caller's back
    when it ends (seeded at random, as an import does, if the caller had not imported torch; CUDA's too), one
    such call at a time. Any other leaves the generator alone: unseeded sampling moves it on as ``generate``
    does (taking its turn: its draws between a seeded call's would change that one's text), and a call never
    takes back the draws other threads made meanwhile (``eval --seed`` seeds its own generators)."""
    generate = args.command == "generate"
    if args.command not in ("distill", "bench", "demo") and not (generate and args.seed is not None):
        with _SEEDED if generate and args.temperature > 0 else contextlib.nullcontext():
            yield
        return
    with _SEEDED:
        torch = sys.modules.get("torch")  # (not imported here: refusals before the command's import stay quick)
        state = torch.get_rng_state() if torch is not None else None
        cuda = torch.cuda.get_rng_state_all() if torch is not None and torch.cuda.is_initialized() else None
        try:
            yield
        finally:
            torch = sys.modules.get("torch")
            if torch is not None:
                if state is not None:
                    torch.set_rng_state(state)
                else:  # (torch seeds its generator at random when imported)
                    torch.seed()
                if cuda is not None:
                    torch.cuda.set_rng_state_all(cuda)
                elif state is not None:  # (a random seed queued until CUDA starts, in place of the command's)
                    torch.cuda.manual_seed_all(torch.Generator().seed())


@contextlib.contextmanager
def _grad_as_in_a_process():
    """Autograd as a new process has it (enabled, not in inference mode), in this thread, for the call: the
    commands choose where they need none, and distill and bench train (under a caller's torch.no_grad() or
    inference_mode() they failed). Nothing to set where the caller has not imported torch."""
    torch = sys.modules.get("torch")
    if torch is None:
        yield
        return
    with torch.inference_mode(False), torch.enable_grad():
        yield


_SETTINGS_LOCK = threading.Lock()
_SETTINGS = dict(depth=0, saved=None)  # main() calls running now (threads), and what the first found


@contextlib.contextmanager
def _command_settings(verbose: bool, no_bars: bool, rank: int):
    """Logging, the libraries' verbosity and their progress bars as a command wants them, for this call only:
    a program calling :func:`main` gets its own back (its root handlers and levels, the environment, transformers',
    datasets' and the hub's settings, torch's threads), and a later call logs to the stderr of its
    own time. Calls running at once in threads share the first one's settings until the last one ends."""
    with _SETTINGS_LOCK:
        if _SETTINGS["depth"] == 0:
            _SETTINGS["saved"] = _apply_settings(verbose, no_bars, rank)
        _SETTINGS["depth"] += 1
    try:
        yield
    finally:
        with _SETTINGS_LOCK:
            _SETTINGS["depth"] -= 1
            if _SETTINGS["depth"] == 0:
                _restore_settings(_SETTINGS.pop("saved"))
                _SETTINGS["saved"] = None


def _apply_settings(verbose: bool, no_bars: bool, rank: int) -> dict:
    """Set what :func:`_command_settings` scopes; returns what :func:`_restore_settings` puts back."""
    root, ours = logging.getLogger(), logging.getLogger("bsbr")
    torch = sys.modules.get("torch")  # a program that has not imported torch has no threads setting to keep
    saved = dict(env={k: os.environ.get(k) for k in _ENV}, root_level=root.level, ours_level=ours.level,
                 libraries=_library_settings(), handler=None,
                 threads=torch.get_num_threads() if torch is not None else None)
    try:
        importlib.import_module("bsbr.arguments").IN_COMMAND.set()
        if not verbose and "TRANSFORMERS_VERBOSITY" not in os.environ:
            # transformers' multi-line warnings (a load report before a refused checkpoint): -v shows them
            os.environ["TRANSFORMERS_VERBOSITY"] = "error"
            if "transformers" in sys.modules:  # imported already (a subcommand's parser): it read the variable then
                from transformers.utils import logging as hf_logging

                hf_logging.set_verbosity_error()
        if not verbose and "DATASETS_VERBOSITY" not in os.environ:
            # datasets logs a data file it cannot parse as an error of its own before raising: the raise is the
            # command's one-line error; -v shows the log
            os.environ["DATASETS_VERBOSITY"] = "critical"
            if sys.modules.get("datasets") is not None:  # (None: its import blocked)
                sys.modules["datasets"].logging.set_verbosity(logging.CRITICAL)
        if no_bars and os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS") is None:  # (the variable, set, rules the hub)
            from huggingface_hub.utils import disable_progress_bars  # (transformers, imported later, follows it)

            disable_progress_bars()
            if "transformers" in sys.modules:
                from transformers.utils import logging as hf_logging

                hf_logging.disable_progress_bar()
        # bsbr's progress at INFO; other libraries' only from WARNING on (torch logs cache statistics at exit)
        # under torchrun, the processes past the first say only what goes wrong, and say which process they are
        if not root.handlers:  # (as logging.basicConfig: a program's own handlers are kept, none added)
            handler = saved["handler"] = logging.StreamHandler(sys.stderr)
            handler.setFormatter(_Formatter("%(asctime)s %(name)s" + (f" (rank {rank})" if rank else "") +
                                            ": %(level)s%(message)s", datefmt="%H:%M:%S"))
            root.addHandler(handler)
            root.setLevel(logging.WARNING)  # (-v too: matplotlib alone logged 2,118 font lines for one plot)
        ours.setLevel(logging.DEBUG if verbose else logging.INFO if not rank else logging.WARNING)
    except BaseException:
        _restore_settings(saved)
        raise
    return saved


class _Formatter(logging.Formatter):
    """Progress lines as they are; a warning or an error says so before its message ("warning: ...")."""

    def formatMessage(self, record):
        record.level = "" if record.levelno < logging.WARNING else f"{record.levelname.lower()}: "
        return super().formatMessage(record)


def _restore_settings(saved: dict) -> None:
    root = logging.getLogger()
    if saved["handler"] is not None:
        root.removeHandler(saved["handler"])
    root.setLevel(saved["root_level"])
    logging.getLogger("bsbr").setLevel(saved["ours_level"])
    for k, v in saved["env"].items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    _restore_library_settings(saved["libraries"])
    torch = sys.modules.get("torch")
    if saved["threads"] is not None:  # (the commands set torch's threads)
        torch.set_num_threads(saved["threads"])


def _library_settings() -> dict:
    """transformers', datasets' and the hub's verbosity and progress-bar switches, for those imported (None for
    one imported later: its defaults, from the environment as it is restored)."""
    from .progress import hub_bar_states

    hub = sys.modules.get("huggingface_hub.constants")  # (offline while a command finds the hub unreachable)
    got = dict(huggingface_hub=dict(hub_bar_states()), offline=None if hub is None else hub.HF_HUB_OFFLINE)
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        got["transformers"] = (hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled())
    if sys.modules.get("datasets") is not None:
        got["datasets"] = sys.modules["datasets"].logging.get_verbosity()
    return got


def _restore_library_settings(saved: dict) -> None:
    from huggingface_hub.utils import are_progress_bars_disabled

    from .progress import hub_bar_states

    def hub_states() -> None:
        states = hub_bar_states()
        states.clear()
        states.update(saved["huggingface_hub"])

    hub_states()
    if sys.modules.get("bsbr.arguments") is not None:  # (the offline mode its probe set ends here)
        sys.modules["bsbr.arguments"].IN_COMMAND.clear()
        sys.modules["bsbr.arguments"]._PROBED_OFFLINE.clear()
    hub = sys.modules.get("huggingface_hub.constants")
    if hub is not None:  # (imported during the command: the value it reads from the environment, as restored)
        value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE")
        hub.HF_HUB_OFFLINE = saved["offline"] if saved["offline"] is not None else \
            value is not None and value.upper() in getattr(hub, "ENV_VARS_TRUE_VALUES", {"1", "ON", "YES", "TRUE"})
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        level, bars = saved.get("transformers", (None, not are_progress_bars_disabled()))
        hf_logging.set_verbosity(hf_logging._get_default_logging_level() if level is None else level)
        if hf_logging.is_progress_bar_enabled() != bars:
            with warnings.catch_warnings():  # (the hub warns when its variable rules)
                warnings.simplefilter("ignore")
                (hf_logging.enable_progress_bar if bars else hf_logging.disable_progress_bar)()
            hub_states()  # (transformers' switch sets the hub's too)
    if sys.modules.get("datasets") is not None:
        from datasets.utils import logging as ds_logging

        level = saved.get("datasets")
        ds_logging.set_verbosity(ds_logging._get_default_logging_level() if level is None else level)


def _run_main(parser, args, verbose: bool, no_bars: bool) -> int:
    rank = _rank(args)
    if not getattr(args, "func", None):
        # no command, or a command with subcommands (bench) given none: its help, on stderr
        (parser.commands.choices[args.command] if args.command else parser).print_help(sys.stderr)
        return EXIT_USAGE
    name = " ".join(filter(None, [args.command, getattr(args, "bench_command", None)])) + (f" (rank {rank})" if rank
                                                                                          else "")
    caller = sys.stdout
    try:
        closed = getattr(caller, "closed", False) is True
    except Exception:  # (a caller's own stream, whose closed property fails)
        closed = False
    stdout = None if closed else caller  # (a caller's closed file: as >&-)
    if stdout is None and args.command == "generate":  # started with stdout closed (>&-): its text would go nowhere
        print("bsbr generate: error: stdout is closed, and the generated text is written there: give it a file "
              "or a pipe", file=sys.stderr)
        return EXIT_USAGE
    if stdout is None and not _writes_files(args):  # (its results are printed, and nowhere else)
        print(f"bsbr {name}: error: stdout is closed, and the results are printed there alone: give it a file or a "
              "pipe, or --json", file=sys.stderr)
        return EXIT_USAGE
    if args.command != "generate":
        sys.stdout = _ClosedPipeIgnored(stdout, stop=not _writes_files(args))
    from .progress import bars_off

    try:
        with bars_off(no_bars):
            code = _run_command(args, name, verbose)
        failed = getattr(sys.stdout, "failed", None)
        if failed is not None and code == 0:  # what it printed is lost (its files, if any, are written)
            print(f"bsbr {name}: error: stdout: {failed.strerror or failed}: what the command printed is lost"
                  + (" (the files it was asked for were written)" if _writes_files(args) else ""), file=sys.stderr)
            return EXIT_USAGE
        return code
    finally:
        if isinstance(sys.stdout, _ClosedPipeIgnored):
            sys.stdout = caller


def _writes_files(args) -> bool:
    """Whether the command was asked to write files (a model, a checkpoint, --json, a plot, a task), not only to
    print its results."""
    return args.command in ("convert", "distill", "demo") or any(
        getattr(args, name, None) for name in ("json", "plot", "passkey_plot", "lm_eval_task_dir"))


def _rank(args) -> int:
    """This process's rank in a data-parallel ``bsbr distill`` under torchrun (0 otherwise)."""
    try:
        if args.command != "distill" or int(os.environ.get("WORLD_SIZE", "1") or 1) < 2:
            return 0
        return int(os.environ.get("RANK", "0") or 0)
    except ValueError:  # (not torchrun's: torch.distributed refuses them in the command, in one line)
        return 0


def _run_command(args, name: str, verbose: bool) -> int:
    """The command, inside the one error boundary."""
    try:
        code = int(args.func(args) or 0)
        if callable(flush := getattr(sys.stdout, "flush", None)):  # (what it printed, delivered or named here: not
            flush()  # lost at exit; a caller's stdout may have no flush)
        return _interrupted(name) if INTERRUPTED.is_set() else code  # (an interrupt a library swallowed)
    except (KeyboardInterrupt, Exception) as e:  # the one error boundary
        if verbose and not isinstance(e, (KeyboardInterrupt, BrokenPipeError)):  # the traceback, then the same
            traceback.print_exc()  # line and exit status as without -v
        if isinstance(e, KeyboardInterrupt) or INTERRUPTED.is_set():  # (an import interrupted midway can
            return _interrupted(name)  # fail as another error)
        if isinstance(e, BrokenPipeError):  # stdout's reader closed it: stop, and say nothing more to it
            _STDOUT_LOST.set()
            return EXIT_PIPE
        from .errors import UserError

        if isinstance(e, (UserError, ValueError, TypeError, OSError, ImportError)) or \
                type(e).__name__ == "SafetensorError":  # bad input, not a bug
            what, code = _one_line(e), EXIT_USAGE
        elif isinstance(e, MemoryError) or "can't allocate memory" in str(e):  # inputs too large for this machine
            cut = _one_line(e)
            if len(cut) > 160:  # at a word's end, unless that loses more than half of it (a long path)
                space = cut.rfind(" ", 0, 157)
                cut = cut[:space if space >= 80 else 156] + " ..."
            what, code = (f"out of memory ({cut}): give shorter "
                          "or fewer inputs, or smaller sizes "
                          "(a model's sink tokens or window, a benchmark's model)"), EXIT_USAGE
        else:
            what, code = (f"internal error {type(e).__name__}: {_one_line(e)} "
                          + ("(report it with the traceback above)" if verbose
                             else "(rerun with -v for the traceback and report it)")), EXIT_INTERNAL
        print(f"bsbr {name}: error: {what}", file=sys.stderr)
        return code


if __name__ == "__main__":
    run()
