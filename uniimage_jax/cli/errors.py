"""User errors -> one line on stderr and exit status 2, for every command.

    from uniimage_jax.cli.errors import add_debug_argument, run_command

    def main(argv=None) -> int:
        args = build_parser().parse_args(argv)          # parser has add_debug_argument(p)
        return run_command("uniimage-x", lambda: _main(args), debug=args.debug)

What counts as a user error (`is_user_error`), printed as `uniimage-x: error: MESSAGE`, exit 2:
- `uniimage_jax.errors.UserError` and its subclasses (`ConfigError`, `ConversionError`,
  `ManifestError`, `UnreadableImageError`, ...). New code raising for bad input should raise one of
  these (or subclass `UserError`): a plain `ValueError` keeps its traceback, on purpose, because
  it may just as well be a bug;
- `FileNotFoundError`, `IsADirectoryError`, `NotADirectoryError`, `PermissionError`,
  `FileExistsError` (a path the user gave);
- a full disk (`OSError` ENOSPC, or EDQUOT), also when a library wrapped it in its own exception
  (the cause / context chain is searched) or reported it as text: TensorStore, which writes
  Orbax checkpoints, raises `ValueError("RESOURCE_EXHAUSTED: ... No space left on device")`.
  One line naming the path where known; `quiet_disk_full_logs` drops the tracebacks that Orbax's
  background threads log for the same failure (the command's own line says it).
Everything else (genuine bugs) propagates with its traceback (exit 1). `--debug` (or the
environment variable UNIIMAGE_DEBUG=1) shows the traceback of user errors too.

SIGTERM (a scheduler stopping the job, `kill`, `docker stop`): while `fn` runs, the first SIGTERM
raises `uniimage_jax.errors.Terminated` in the main thread, so every clean-up runs (temporary
files and folders of atomic writes are removed); the command prints
`uniimage-x: stopped by SIGTERM[: what was kept and how to continue]` and exits with status
TERMINATED_EXIT_CODE (143 = 128 + SIGTERM, what a shell shows for a process the signal ended).
Later SIGTERMs during the clean-up are ignored. Code that handles SIGTERM itself (the trainer
saves a checkpoint and stops) installs its own handler meanwhile.
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import sys
import threading
from typing import Callable

from uniimage_jax.errors import Terminated, UserError

USER_OS_ERRORS = (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError,
                  FileExistsError)
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
_DISK_FULL_TEXT = (os.strerror(errno.ENOSPC), os.strerror(errno.EDQUOT))
DEBUG_ENV = "UNIIMAGE_DEBUG"
TERMINATED_EXIT_CODE = 128 + signal.SIGTERM


def _chain(e: BaseException):
    """`e`, then its causes / contexts (each once)."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__ or e.__context__


def disk_full_error(e: BaseException) -> BaseException | None:
    """The exception in `e`'s chain that says the disk is full (module docstring), if any."""
    for x in _chain(e):
        if isinstance(x, OSError) and x.errno in _DISK_FULL:
            return x
        if any(text in str(x) for text in _DISK_FULL_TEXT):
            return x
    return None


class _DropDiskFull(logging.Filter):
    """Drops records whose message or attached exception says the disk is full."""

    def filter(self, record: logging.LogRecord) -> bool:
        if any(text in record.getMessage() for text in _DISK_FULL_TEXT):
            return False
        return not (record.exc_info and record.exc_info[1] is not None
                    and disk_full_error(record.exc_info[1]) is not None)


def quiet_disk_full_logs(*loggers: str, debug: bool = False) -> None:
    """Drop log records about a full disk from `loggers` (e.g. "absl", which Orbax logs
    through), unless debugging: the command reports the full disk itself, in one line."""
    if not debug_requested(debug):
        for name in loggers:
            logging.getLogger(name).addFilter(_DropDiskFull())


def is_user_error(e: BaseException) -> bool:
    return (isinstance(e, (UserError, *USER_OS_ERRORS))
            or disk_full_error(e) is not None)


def describe(e: BaseException, where: str | None = None) -> str:
    """The message of a user error. `where`: the directory being written, named when a full disk
    does not say which file it was writing."""
    full = disk_full_error(e)
    if full is not None and not isinstance(e, UserError):
        path = getattr(full, "filename", None) or where
        return "no space left on device" + (f" writing {path}" if path else "") + (
            ": free some space (or use another --workdir) and rerun the same command; "
            "training resumes from its last checkpoint")
    if isinstance(e, OSError) and e.filename is not None:
        # FileNotFoundError(2, 'No such file or directory', 'x') prints as "[Errno 2] ...: 'x'".
        return f"{e.strerror or type(e).__name__}: {e.filename}"
    return str(e) or type(e).__name__


def debug_requested(debug: bool = False) -> bool:
    return bool(debug) or os.environ.get(DEBUG_ENV, "") not in ("", "0")


def add_debug_argument(parser) -> None:
    """`--debug` for an argparse parser."""
    parser.add_argument("--debug", action="store_true",
                        help=f"show the traceback of a user error (or set {DEBUG_ENV}=1)")


def run_command(prog: str, fn: Callable[[], int | None], *, debug: bool = False,
                where: str | None = None, exit_at_once_if_disk_full: bool = False) -> int:
    """Call `fn`; a user error becomes one line on stderr and exit status 2, SIGTERM one line and
    exit status 143 (module docstring).

    exit_at_once_if_disk_full: end the process right after the line (`os._exit(2)`) when the disk
      is full. For commands whose background writers (TensorStore, under Orbax) are still failing
      then: at interpreter shutdown they print dozens of "Event loop is closed" tracebacks.
    """
    installed, previous = _raise_on_sigterm()
    try:
        return fn() or 0
    except Terminated as e:
        print(f"{prog}: stopped by SIGTERM" + (f": {e}" if str(e) else ""), file=sys.stderr,
              flush=True)
        return TERMINATED_EXIT_CODE
    except Exception as e:  # noqa: BLE001: re-raised unless it is a user error
        if debug_requested(debug) or not is_user_error(e):
            raise
        print(f"{prog}: error: {describe(e, where)}", file=sys.stderr, flush=True)
        if exit_at_once_if_disk_full and disk_full_error(e) is not None:
            sys.stdout.flush()
            os._exit(2)
        return 2
    finally:
        if installed:
            signal.signal(signal.SIGTERM, previous)


def _raise_on_sigterm():
    """Install the handler that turns the first SIGTERM into `Terminated`; returns (installed,
    the handler it replaced). Nothing is installed off the main thread, where Python delivers
    no signals."""
    if threading.current_thread() is not threading.main_thread():
        return False, None
    raised = []

    def handle(signum, frame):
        if not raised:  # once: the clean-up the first one started must not be cut short
            raised.append(signum)
            raise Terminated()

    previous = signal.signal(signal.SIGTERM, handle)
    return True, signal.SIG_DFL if previous is None else previous
