"""What a training run shows and keeps about itself: TensorBoard scalars and `metrics.jsonl` in the
stage directory (process 0 only; the stage directory may be a `gs://` path, written through
`etils.epath`, which TensorBoard's writer also reads), and the console's progress bar."""

from __future__ import annotations

import json

from etils import epath


class MetricsWriter:
    """TensorBoard scalars + a metrics.jsonl beside them (process 0 only)."""

    def __init__(self, stage_dir: str):
        from tensorboardX import SummaryWriter

        self.stage_dir = epath.Path(stage_dir)
        self.stage_dir.mkdir(parents=True, exist_ok=True)
        self.tb = SummaryWriter(str(self.stage_dir / "tensorboard"))
        self.jsonl = (self.stage_dir / "metrics.jsonl").open("a")

    def scalars(self, step: int, metrics: dict, prefix: str = "train/"):
        """One metrics.jsonl record and a TensorBoard scalar per key (tag: prefix + key)."""
        for k, v in metrics.items():
            self.tb.add_scalar(f"{prefix}{k}", v, step)
        self.jsonl.write(json.dumps({"step": step, **metrics}) + "\n")
        self.jsonl.flush()

    def buckets(self, step: int, histogram: dict):
        """The aspect-bucket histogram ({"HxW": examples}): TensorBoard and buckets.json."""
        for label, count in histogram.items():
            self.tb.add_scalar(f"data/bucket_examples/{label}", count, step)
        (self.stage_dir / "buckets.json").write_text(
            json.dumps({"step": step, "examples_per_bucket": histogram}, indent=1))

    def close(self):
        self.tb.close()
        self.jsonl.close()


def progress_bar(start: int, total: int, enabled: bool, desc: str = "train", unit: str = "step"):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=start, desc=desc, unit=unit, disable=not enabled,
                dynamic_ncols=True)
