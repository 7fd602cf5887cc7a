"""Paths as users type them: made absolute where they enter, URLs (`gs://...`) left alone.

Orbax refuses relative checkpoint paths, and a relative path stored in a run's config means
something else once the run is resumed or sampled from another directory. So every path a command
or a config field takes goes through `absolute` once, when it enters: a local path becomes
absolute against the current directory (`~` expanded), and anything with a URL scheme
(`gs://bucket/run`, `s3://...`, `file://...`) is returned unchanged, since `os.path` would
mangle it (`gs:/bucket`). The empty string stays empty: config fields use it for "not set".
"""

from __future__ import annotations

import os
import re

_URL_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def is_url(path: str | os.PathLike) -> bool:
    """Whether `path` has a URL scheme (gs://, s3://, file://, ...)."""
    return bool(_URL_SCHEME.match(os.fspath(path)))


def absolute(path: str | os.PathLike | None) -> str | None:
    """`path` made absolute against the current directory; URLs, "" and None unchanged."""
    if path is None:
        return None
    path = os.fspath(path)
    if not path or is_url(path):
        return path
    return os.path.abspath(os.path.expanduser(path))
