"""Text and JSON-lines files read strictly: every error names file:line.

Lines are decoded one at a time (rather than by a text-mode file object, whose UnicodeDecodeError
says neither file nor line), so a file that is not UTF-8 is reported at its first bad line.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator


def read_text_lines(path: str, *, error: type[Exception] = ValueError
                    ) -> Iterator[tuple[int, str]]:
    """(line number from 1, the line without its newline) of a UTF-8 text file (a UTF-8 BOM is
    dropped). A directory, or a line that is not UTF-8, raises `error` naming file (and line)."""
    if os.path.isdir(path):
        raise error(f"{path} is a directory, not a file")
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise error(f"{path}:{lineno}: not UTF-8 text (byte 0x{raw[e.start]:02x} at "
                            f"column {e.start + 1}); save the file as UTF-8") from None
            yield lineno, line.rstrip("\r\n")


def read_json_objects(path: str, *, error: type[Exception] = ValueError,
                      skip_blank: bool = True) -> list[tuple[int, str, dict]]:
    """(line number from 1, the line without its newline, the parsed object) per line. Blank
    lines are skipped, or with `skip_blank=False` an error like any other line that is not a JSON
    object; errors are raised as `error`."""
    out = []
    for lineno, line in read_text_lines(path, error=error):
        if skip_blank and not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise error(f"{where}: not valid JSON ({e.msg})") from None
        if not isinstance(obj, dict):
            raise error(f"{where}: expected a JSON object, got {type(obj).__name__}")
        out.append((lineno, line, obj))
    return out
