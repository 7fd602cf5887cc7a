"""JSON-lines files read strictly: every line one JSON object, every error naming file:line."""

from __future__ import annotations

import json


def read_json_objects(path: str, *, error: type[Exception] = ValueError,
                      skip_blank: bool = True) -> list[tuple[int, str, dict]]:
    """(line number from 1, the line without its newline, the parsed object) per line. Blank
    lines are skipped, or with `skip_blank=False` an error like any other line that is not a JSON
    object; errors are raised as `error`."""
    out = []
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            line = line.rstrip("\r\n")
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
