"""The project's user-error types: bad input the user can fix (a file, a flag, a config field).

Every command (`uniimage_jax/cli/errors.py`) prints a `UserError` as one line
`uniimage-X: error: MESSAGE` and exits 2, without a traceback. Anything else (a `ValueError` from
numpy, a shape bug in a model, ...) keeps its traceback: only errors raised deliberately for bad
input derive from `UserError`. The message must name the culprit: the file (and line or key),
the flag, or the config field.

This module imports nothing so that every layer (data, models, train, convert, sampling, cli) can
raise these.
"""


class UserError(ValueError):
    """Bad input the user can fix. A `ValueError`, so callers catching `ValueError` keep working."""


class ConfigError(UserError):
    """A config field (or command-line flag) with an impossible value; the message names it."""


class ConversionError(UserError):
    """A checkpoint does not match the target architecture. The message names every bad key."""

    def __init__(self, source: str, missing=(), unexpected=(), mismatched=(), other=()):
        self.missing = sorted(missing)
        self.unexpected = sorted(unexpected)
        self.mismatched = sorted(mismatched)
        self.other = list(other)
        lines = [f"cannot convert {source}: the checkpoint does not match the architecture"]
        if self.missing:
            lines.append(f"  missing ({len(self.missing)}): no source tensor for these parameters:")
            lines += [f"    {k}" for k in self.missing]
        if self.unexpected:
            lines.append(f"  unexpected ({len(self.unexpected)}): source tensors with no parameter:")
            lines += [f"    {k}" for k in self.unexpected]
        if self.mismatched:
            lines.append(f"  mis-shaped ({len(self.mismatched)}):")
            lines += [f"    {k}" for k in self.mismatched]
        lines += [f"  {m}" for m in self.other]
        super().__init__("\n".join(lines))


class Terminated(BaseException):
    """SIGTERM, raised in the main thread by every command's handler (`cli/errors.run_command`)
    so that clean-ups run (`finally` blocks; atomic writes remove their temporary files) before
    the command says so in one line (`uniimage-X: stopped by SIGTERM: DETAIL`) and exits with
    status 143 (128 + SIGTERM, as a shell reports a process the signal ended). Not an
    `Exception`, so `except Exception` does not swallow it. The message, when given, says what
    was kept and how to continue. (The trainer catches SIGTERM itself: it saves and stops.)"""
