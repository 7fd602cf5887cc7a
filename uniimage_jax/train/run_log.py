"""What a training run shows and keeps about itself: TensorBoard scalars and `metrics.jsonl` in the
stage directory (process 0 only), and the console's progress bar.

The stage directory may be on Cloud Storage (`gs://`), where an object cannot be appended to: it
is written whole, and replaced whole. So on a bucket `metrics.jsonl` is kept in memory (what the
object held when the run started, plus this run's lines) and the object is rewritten at most
every `upload_every_s` seconds when a line is logged, at every checkpoint (`sync`) and at the
end. A crash loses no line the resumed run will not log again: everything logged before the last
checkpoint is on the bucket, and the steps after it are trained and logged again on resume
(locally the file is appended to as before; a step logged twice is read as its last record).
Rewriting a growing object costs its size each time: ~300 bytes a line, so a 10 000-line log is
3 MB per upload, once a minute at most.

TensorBoard's event files on a bucket go through the same storage layer (tensorboardX's own `gs`
writer, google-cloud-storage, does not retry a failed upload and would be a second client to
point at an emulator): the event file is buffered and rewritten whole when tensorboardX flushes
(every `flush_secs`), at every checkpoint and at the end.
"""

from __future__ import annotations

import io
import json
import logging
import threading
import time

from uniimage_jax import storage

log = logging.getLogger("uniimage_jax.train")

UPLOAD_EVERY_S = 60.0


class JsonLinesLog:
    """An append-only JSON-lines file, local or on a bucket (module docstring)."""

    def __init__(self, path: str, upload_every_s: float = UPLOAD_EVERY_S):
        self.path, self.upload_every_s = path, upload_every_s
        self.remote = storage.is_remote(path)
        if self.remote:
            self._data = bytearray(storage.read_bytes(path) if storage.exists(path) else b"")
            if self._data and not self._data.endswith(b"\n"):
                self._data += b"\n"
            self._uploaded_at, self._dirty = time.monotonic(), False
        else:
            self._fh = open(path, "a", encoding="utf-8")

    def append(self, record: dict) -> None:
        line = json.dumps(record) + "\n"
        if not self.remote:
            self._fh.write(line)
            self._fh.flush()
            return
        self._data += line.encode("utf-8")
        self._dirty = True
        if time.monotonic() - self._uploaded_at >= self.upload_every_s:
            self.sync()

    def sync(self) -> None:
        """Make every line logged so far durable (on a bucket: one upload, if any is new)."""
        if not self.remote:
            self._fh.flush()
            return
        if not self._dirty:
            return
        try:
            storage.write_bytes(self.path, bytes(self._data))
        except OSError as e:  # after the client's retries; the next sync tries again
            log.warning("could not write %s (kept in memory, retried later): %s", self.path, e)
            return
        self._uploaded_at, self._dirty = time.monotonic(), False

    def close(self) -> None:
        if not self.remote:
            self._fh.close()
            return
        self.sync()
        if self._dirty:
            log.error("%s: the last lines of this run could not be written", self.path)


class _BufferedEventFile:
    """A TensorBoard event file on a bucket, for tensorboardX's record writer: buffered and
    written whole on each flush (module docstring)."""

    def __init__(self, path: str):
        self.path = path
        self._buffer = io.BytesIO()
        self._lock = threading.Lock()  # tensorboardX writes and flushes from its own thread
        self._upload_lock = threading.Lock()  # and a checkpoint's sync from the main thread
        self._flushed_size = -1

    def write(self, data: bytes) -> None:
        with self._lock:
            self._buffer.write(data)

    def flush(self) -> None:
        with self._upload_lock:
            with self._lock:
                data = self._buffer.getvalue()
            if len(data) == self._flushed_size:
                return
            try:
                storage.write_bytes(self.path, data)
            except OSError as e:  # after the client's retries; the next flush tries again
                log.warning("could not write %s (kept in memory, retried later): %s", self.path,
                            e)
                return
            self._flushed_size = len(data)

    def close(self) -> None:
        self.flush()


class _BucketEventFiles:
    """tensorboardX's writer factory protocol (`open`, `directory_check`) for `gs://`."""

    def open(self, path: str) -> _BufferedEventFile:
        return _BufferedEventFile(path)

    def directory_check(self, path: str) -> None:
        pass  # directories are implicit on a bucket


def _route_tensorboard_through_storage() -> None:
    from tensorboardX import record_writer

    record_writer.register_writer_factory("gs", _BucketEventFiles())


class MetricsWriter:
    """TensorBoard scalars + a metrics.jsonl beside them (process 0 only)."""

    def __init__(self, stage_dir: str, upload_every_s: float = UPLOAD_EVERY_S):
        from tensorboardX import SummaryWriter

        _route_tensorboard_through_storage()
        self.stage_dir = str(stage_dir)
        storage.makedirs(self.stage_dir)
        self.tb = SummaryWriter(storage.join(self.stage_dir, "tensorboard"))
        self.jsonl = JsonLinesLog(storage.join(self.stage_dir, "metrics.jsonl"), upload_every_s)

    def scalars(self, step: int, metrics: dict, prefix: str = "train/"):
        """One metrics.jsonl record and a TensorBoard scalar per key (tag: prefix + key)."""
        for k, v in metrics.items():
            self.tb.add_scalar(f"{prefix}{k}", v, step)
        self.jsonl.append({"step": step, **metrics})

    def sync(self):
        """At a checkpoint: everything logged so far made durable (module docstring)."""
        self.tb.flush()
        self.jsonl.sync()

    def buckets(self, step: int, histogram: dict):
        """The aspect-bucket histogram ({"HxW": examples}): TensorBoard and buckets.json."""
        for label, count in histogram.items():
            self.tb.add_scalar(f"data/bucket_examples/{label}", count, step)
        storage.write_text(storage.join(self.stage_dir, "buckets.json"), json.dumps(
            {"step": step, "examples_per_bucket": histogram}, indent=1))

    def close(self):
        self.tb.close()
        self.jsonl.close()


def progress_bar(start: int, total: int, enabled: bool, desc: str = "train", unit: str = "step"):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=start, desc=desc, unit=unit, disable=not enabled,
                dynamic_ncols=True)
