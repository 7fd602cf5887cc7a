"""A local Cloud Storage server for tests and rehearsals, with faults on demand.

The server is `gcp-storage-emulator` (PyPI, pure Python; the `[emulator]` extra) run in a thread
of this process, with two additions the clients of this project need:

- `moveTo` (`POST /storage/v1/b/B/o/SRC/moveTo/o/DST`), which gcsfs tries first for every
  rename; the emulator lacks it, and gcsfs would retry its 501 for ~35 s before falling back to
  copy + delete. Here it is a copy then a delete, what the fallback does, answered at once.
- Faults: `fail(status, seconds, ...)` makes matching requests answer `status` (503, 429, ...)
  with a Cloud Storage error body for `seconds`, then serve normally again: a throttled or
  unavailable bucket. The same over HTTP, for an emulator in another process:
  `POST /_emulator/fail?status=503&seconds=5[&methods=PUT,POST][&match=REGEX]`.

How each library in play reaches it (`client_env()` gives the variables; set them before the
library is first used in a process; subprocesses inherit them):
- gcsfs (fsspec), and through it `etils.epath` and this project's storage layer (metrics, locks,
  lineage, caches, sample sheets, Orbax's file operations, uploads and local copies):
  STORAGE_EMULATOR_HOST=http://HOST:PORT. gcsfs's bucket-type probe (gRPC, for zonal buckets)
  waits about 60 s per bucket against an emulator: GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false
  switches it off. EPATH_USE_TF=false keeps epath off TensorFlow's gfile (below).
- tensorstore (Orbax's arrays, `gcs` kvstore): TENSORSTORE_GCS_HTTP_URL=http://HOST:PORT and
  GOOGLE_AUTH_TOKEN_FOR_TESTING (any value: no credentials are looked up). A spec with an
  `endpoint` member is refused by tensorstore 0.1.86, so the environment is the only way.
  tensorstore reads an object's generation from the `x-goog-generation` header of a download to
  make its next conditional request on an OCDBT manifest; this server adds that header, which
  gcp-storage-emulator leaves out (without it a state of ~100 arrays fails to save with
  "Malformed StorageGeneration").
- google-cloud-storage: STORAGE_EMULATOR_HOST as above (tensorboardX's own `gs://` writer uses
  it; the project routes TensorBoard event files through the storage layer instead, see
  train/run_log.py, so one client with one retry policy writes every file).
- Hugging Face `datasets` (`load_from_disk` / `save_to_disk` of gs:// paths): through fsspec and
  gcsfs, so STORAGE_EMULATOR_HOST as above.
- Libraries that cannot be pointed at it, and how their paths are covered:
  - ArrayRecord (grain's `ArrayRecordDataSource`, the latent cache, TFDS's prepared datasets):
    its C++ reader and writer open local files only (against a bucket path they fail or hang).
    The latent cache writes shards locally and uploads them, and reads them through the local
    cache (data/latent_records.py); a TFDS `data_dir` on gs:// is refused at start-up
    (train/config_paths.py).
  - TensorFlow's gfile and the JAX profiler (both TensorFlow's TSL file system): their Cloud
    Storage driver always dials www.googleapis.com. epath is kept off gfile (EPATH_USE_TF), and
    a profiler trace for a gs:// stage directory is written locally and uploaded
    (train/profiling.py).
  - safetensors' `safe_open` memory-maps a local file: a checkpoint on gs:// is copied into the
    local cache first (`storage.local_copy` / `local_mirror`); nothing is ever unpickled.
  - PIL and transformers (`from_pretrained`) write and read local files: images are encoded to
    bytes and written with `storage.write_bytes`; a processor directory on gs:// is copied into
    the local cache (processing/qwen.py).

Bucket names must be valid Cloud Storage names (3-63 characters): tensorstore checks them.

Run one by hand: `python -m uniimage_jax.storage.emulator --port 9023 --bucket my-bucket` prints
the `export` lines for a shell, then serves until interrupted.
"""

from __future__ import annotations

import argparse
import json
import re
import signal
import threading
import time
from functools import partial
from http import HTTPStatus, server
from urllib.parse import parse_qs, unquote, urlparse

FAULT_ROUTE = "/_emulator/fail"
_MOVE_TO = re.compile(r"^(?P<prefix>(?:/storage/v1)?/b/(?P<bucket>[-.\w]+)/o/)"
                      r"(?P<src>.*[^/])/moveTo/o/(?P<dst>.*[^/])$")
_OBJECT = re.compile(r"^(?:/download)?(?:/storage/v1)?/b/(?P<bucket>[-.\w]+)/o/"
                     r"(?P<name>[^/].*)$")


class _Faults:
    """Which requests fail, until when; shared by the server's handler and its owner."""

    def __init__(self):
        self._lock = threading.Lock()
        self.until = 0.0
        self.status = 503
        self.methods: frozenset[str] = frozenset()
        self.match: re.Pattern | None = None
        self.served = 0   # requests answered with a fault so far

    def set(self, status: int, seconds: float, methods=(), match: str | None = None) -> None:
        with self._lock:
            self.status, self.until = int(status), time.monotonic() + float(seconds)
            self.methods = frozenset(m.upper() for m in methods)
            self.match = re.compile(match) if match else None

    def hit(self, method: str, path: str) -> int | None:
        """The status to answer this request with, or None to serve it."""
        with self._lock:
            if time.monotonic() >= self.until:
                return None
            if self.methods and method not in self.methods:
                return None
            if self.match is not None and not self.match.search(path):
                return None
            self.served += 1
            return self.status


def _handler_class():
    from gcp_storage_emulator import server as emulator_server

    class Handler(emulator_server.RequestHandler):
        """The emulator's handler, behind a fault switch and with `moveTo`."""

        def __init__(self, storage, faults: _Faults, *args, **kwargs):
            self.faults = faults
            super().__init__(storage, *args, **kwargs)

        def _reply(self, status: int, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _dispatch(self, method: str) -> None:
            url = urlparse(self.path)
            if url.path == FAULT_ROUTE:
                return self._set_fault(parse_qs(url.query))
            status = self.faults.hit(method, url.path)
            if status is not None:
                self._drain()
                return self._reply(status, {"error": {
                    "code": status, "message": f"injected fault: {HTTPStatus(status).phrase}",
                    "errors": [{"reason": "backendError", "message": "injected fault"}]}})
            move = _MOVE_TO.match(url.path) if method == "POST" else None
            if move is not None:
                return self._move(move, url.query)
            self._generation_headers = (self._generation_of(url) if method == "GET" else {})
            emulator_server.Router(self).handle(method)

        def _generation_of(self, url) -> dict:
            """The generation headers of a media download (`alt=media`): Cloud Storage sends
            them, the emulator does not, and tensorstore (Orbax's OCDBT manifests) reads the
            object's generation from them to make its next conditional request; without them
            it fails with 'Malformed StorageGeneration' on the second access to a manifest."""
            found = _OBJECT.match(url.path)
            if found is None or not (url.path.startswith("/download")
                                     or "alt=media" in url.query):
                return {}
            try:
                obj = self.storage.get_file_obj(found["bucket"], unquote(found["name"]))
            except Exception:  # the emulator's NotFound: the route answers 404 itself
                return {}
            return {"x-goog-generation": str(obj["generation"]),
                    "x-goog-metageneration": str(obj.get("metageneration", "1"))}

        def end_headers(self):
            for name, value in getattr(self, "_generation_headers", {}).items():
                self.send_header(name, value)
            self._generation_headers = {}
            super().end_headers()

        def _drain(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            if length:
                self.rfile.read(length)

        def _move(self, move: re.Match, query: str) -> None:
            """moveTo as the copy it falls back to, then the source's deletion."""
            bucket, src = move["bucket"], unquote(move["src"])
            self.path = (f"{move['prefix']}{move['src']}/copyTo/b/{bucket}/o/{move['dst']}"
                         + (f"?{query}" if query else ""))
            try:
                self.storage.get_file_obj(bucket, src)
            except Exception:  # the emulator's NotFound: answered by the copy route as 404
                return emulator_server.Router(self).handle("POST")
            emulator_server.Router(self).handle("POST")
            self.storage.delete_file(bucket, src)

        def _set_fault(self, query: dict) -> None:
            def one(name, default=None):
                return query.get(name, [default])[0]

            try:
                self.faults.set(int(one("status", 503)), float(one("seconds", 0)),
                                [m for m in (one("methods") or "").split(",") if m],
                                one("match"))
            except (TypeError, ValueError, re.error) as e:
                return self._reply(400, {"error": {"code": 400, "message": str(e)}})
            self._reply(200, {"status": self.faults.status, "seconds": float(one("seconds", 0))})

        def do_GET(self):
            self._dispatch("GET")

        def do_POST(self):
            self._dispatch("POST")

        def do_PUT(self):
            self._dispatch("PUT")

        def do_DELETE(self):
            self._dispatch("DELETE")

        def do_PATCH(self):
            self._dispatch("PATCH")

    return Handler


class _Server(server.HTTPServer):
    def handle_error(self, request, client_address):
        """A client that hung up (a timeout, a process killed mid-request: what the rehearsals
        do) is not an error of the server; anything else is printed as usual."""
        import sys

        if isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):
            return
        super().handle_error(request, client_address)


class GcsEmulator:
    """A Cloud Storage server on 127.0.0.1 (in memory by default) serving `buckets`.

        with GcsEmulator(buckets=["my-bucket"]) as gcs:
            os.environ.update(gcs.client_env())
            ...  # gs://my-bucket/... now reaches this server
            gcs.fail(503, seconds=5)  # the next 5 s of requests answer 503

    `port=0` picks a free port. `data_dir` keeps the objects on disk instead of in memory.
    """

    def __init__(self, buckets=("uniimage",), host: str = "127.0.0.1", port: int = 0,
                 data_dir: str | None = None):
        self.buckets, self.host, self.port = tuple(buckets), host, int(port)
        self.data_dir = data_dir
        self.faults = _Faults()
        self._httpd = None
        self._thread = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> "GcsEmulator":
        import logging

        from gcp_storage_emulator.handlers import buckets as emulator_buckets
        from gcp_storage_emulator.storage import Storage

        # It logs every request at INFO and a warning for every text reply.
        logging.getLogger("gcp_storage_emulator").setLevel(logging.ERROR)
        storage = Storage(use_memory_fs=self.data_dir is None, data_dir=self.data_dir)
        for name in self.buckets:
            emulator_buckets.create_bucket(name, storage)
        self._httpd = _Server((self.host, self.port),
                              partial(_handler_class(), storage, self.faults))
        self.port = self._httpd.server_address[1]
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True,
                                        name=f"gcs-emulator-{self.port}")
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    def __enter__(self) -> "GcsEmulator":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def client_env(self) -> dict[str, str]:
        """The environment that points this project's clients at this server."""
        return client_env(self.url)

    def fail(self, status: int = 503, seconds: float = 5.0, methods=(),
             match: str | None = None) -> None:
        """Answer matching requests (all, or these HTTP methods, or paths matching the regex
        `match`) with `status` for the next `seconds`."""
        self.faults.set(status, seconds, methods, match)

    @property
    def faults_served(self) -> int:
        return self.faults.served


def client_env(url: str) -> dict[str, str]:
    """Environment variables that point gcsfs / epath / tensorstore at the server at `url`."""
    return {"STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url,
            "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator",
            "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false", "EPATH_USE_TF": "false"}


def request_fault(url: str, status: int = 503, seconds: float = 5.0, methods=(),
                  match: str | None = None) -> None:
    """Ask the emulator at `url` (perhaps in another process) to fail, as `GcsEmulator.fail`."""
    import urllib.parse
    import urllib.request

    query = {"status": status, "seconds": seconds}
    if methods:
        query["methods"] = ",".join(methods)
    if match:
        query["match"] = match
    request = urllib.request.Request(f"{url}{FAULT_ROUTE}?{urllib.parse.urlencode(query)}",
                                     method="POST", data=b"")
    with urllib.request.urlopen(request, timeout=10) as reply:
        reply.read()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m uniimage_jax.storage.emulator",
        description="Serve a local Cloud Storage emulator (in memory) until interrupted; print "
                    "the environment that points gcsfs, epath and tensorstore at it.")
    parser.add_argument("--port", type=int, default=9023)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--bucket", action="append", default=[],
                        help="a bucket to create (repeatable; default: uniimage)")
    parser.add_argument("--data-dir", default=None, help="keep objects here instead of memory")
    args = parser.parse_args(argv)
    emulator = GcsEmulator(args.bucket or ["uniimage"], args.host, args.port, args.data_dir)
    emulator.start()
    for name, value in emulator.client_env().items():
        print(f"export {name}={value}", flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        stop.wait()
    except KeyboardInterrupt:
        pass
    emulator.stop()


if __name__ == "__main__":
    main()
