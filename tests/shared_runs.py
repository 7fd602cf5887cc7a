"""Expensive test artefacts made once per test session and shared by every pytest-xdist worker.

A session-scoped fixture runs once per worker process, so under `pytest -n 2` a tiny trained demo
or a set of stand-in checkpoints would be made twice, each copy competing with the other for the
same two cores. `made_once` makes it once: the first worker to ask builds it under a file lock in
the session's common temporary folder; the others wait on the lock and read what was recorded.
Whoever changes an artefact (writes into it) must copy it first: it is shared.
"""
from __future__ import annotations

import json
import os
import shutil
from typing import Callable

from filelock import FileLock


def session_folder(tmp_path_factory) -> str:
    """The temporary folder common to all workers of this session (each worker's own base
    folder sits inside it, named after the worker), or the base folder without xdist."""
    base = tmp_path_factory.getbasetemp()
    return str(base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base)


def made_once(tmp_path_factory, name: str, build: Callable[[str], dict]) -> dict:
    """`build(folder)`'s result (a JSON-able dict), `build` run once per session in an empty
    `folder` of its own. A build that raised raises again for every later caller, with the first
    error's text, instead of being retried (a retry would only fail again, as slowly)."""
    root = session_folder(tmp_path_factory)
    folder = os.path.join(root, f"shared_{name}")
    record = folder + ".json"
    with FileLock(folder + ".lock"):
        if not os.path.exists(record):
            shutil.rmtree(folder, ignore_errors=True)
            os.makedirs(folder)
            try:
                result = {"ok": build(folder)}
            except Exception as e:  # recorded for the other workers, then raised here
                with open(record, "w") as fh:
                    json.dump({"error": f"{type(e).__name__}: {e}"}, fh)
                raise
            with open(record, "w") as fh:
                json.dump(result, fh)
        with open(record) as fh:
            result = json.load(fh)
    if "error" in result:
        raise RuntimeError(f"the shared test artefact {name!r} could not be made (by another "
                           f"test of this session): {result['error']}")
    return result["ok"]
