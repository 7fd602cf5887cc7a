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
