"""The one-line errors of the command line: a :class:`UserError` is printed as one line and exits with
status 2; its kinds say what was refused. And :data:`INTERRUPTED`, the Ctrl-C that stops a command."""
import errno
import os
import shlex
import threading


class _Interrupt:
    """The Ctrl-C (or SIGTERM) that stops the command running in the main thread, set by :func:`bsbr.cli.main`'s
    handler and remembered should a library swallow the exception. Seen only in the main thread: a command
    another thread runs (a notebook's background job) is not the one interrupted."""

    def __init__(self):
        self._event = threading.Event()

    def set(self) -> None:
        self._event.set()

    def clear(self) -> None:
        self._event.clear()

    def is_set(self) -> bool:
        return self._event.is_set() and threading.current_thread() is threading.main_thread()


INTERRUPTED = _Interrupt()


def check_not_interrupted() -> None:
    """Raise KeyboardInterrupt if a Ctrl-C came, even one a library swallowed (an interrupt raised inside
    a ``__del__`` is only printed): called before an output is published, so an interrupted command
    leaves nothing."""
    if INTERRUPTED.is_set():
        raise KeyboardInterrupt


class UserError(Exception):
    """A refusal or a bad input: the CLI prints it as one line and exits with status 2."""


class OutputError(UserError):
    """An output path the command may not write (exists, not empty, is a file, overlaps an input)."""


class SourceMismatchError(UserError):
    """A reference/teacher whose weights are not the ones the model was converted from."""


class CheckpointError(UserError):
    """A checkpoint that is partial, corrupt, or was written by a run with other settings."""


def command_path(path) -> str:
    """``path`` as a command a message suggests should write it: quoted for the shell, and read as a path, not
    an option, when it starts with ``-``."""
    text = str(path)
    return shlex.quote(f"./{text}" if text.startswith("-") else text)


def reads_as_hub_id(text: str) -> bool:
    """Whether a model path that does not exist reads, as typed, as a hub id ``ORG/NAME`` (not ``./a/b``, ``~/a``,
    ``/a/b`` or ``a/b/c``) whose ``ORG`` is no local folder (that would be a local model's name mistyped): a
    message may then say how to fetch it."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    text = str(text)
    if "/" not in text or os.path.lexists(os.path.expanduser(text)) or os.path.lexists(text.split("/")[0]):
        return False
    try:
        validate_repo_id(text)
    except HFValidationError:
        return False
    return True


def absent(path) -> str:
    """Why ``path`` cannot be found, for an error message (on one line): "does not exist", or a loop of links, a
    link (through links) to nothing, a folder on its way that may not be entered."""
    try:
        os.stat(path)
    except OSError as e:
        if e.errno == errno.ELOOP:
            return "is a loop of symbolic links"
        if e.errno == errno.EACCES:
            return "cannot be reached (permission denied on a folder on its way)"
        if os.path.islink(path):
            return f"is a symbolic link to {' '.join(os.path.realpath(path).split())}, which does not exist"
    return "does not exist"
