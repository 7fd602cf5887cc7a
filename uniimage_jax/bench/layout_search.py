"""The layout a training step should run in on a TPU slice, found ahead of time
(`uniimage-bench --aot TOPOLOGY --search`).

A layout is a mesh split (data x fsdp x tensor over the slice's chips), the DiT's and the MLLM's
remat policies and the frozen towers' sharding; each is tried at the largest per-chip batch that
fits. Per-chip throughput, XLA's estimated samples/s per chip, ranks them. In order:

1. Candidates: every mesh split whose tensor axis divides every attention's head counts (a
   split head would be resharded in every layer), times the policies asked for;
   `frozen_sharding` is a choice only where tensor > 1 (with tensor = 1 both are replicated).
2. Exact argument bytes per chip, from the abstract state's shardings (nothing compiles): a
   layout whose arguments alone exceed the budget is dropped.
3. Memory-only compiles (the scanned program, no cost probes): the largest per-chip batch within
   the budget by `aot.find_max_batch` (memory is about affine in the batch: ~4 compiles,
   exact), starting at `min_batch`; a layout that cannot hold `min_batch` is dropped.
4. Cost compiles for the layouts that fit, at their largest batch and, when that is not a
   multiple of `ROUND_BATCH`, also at the largest multiple below it (`aot.full_depth_figures`:
   the unrolled depth probes under scan; an unrolled program's own cost figures otherwise):
   a batch off the TPU's tiles can run slower per sample than a smaller one on them, so the
   layout keeps whichever of the two is faster per chip.
5. Ranking: est. samples/s per chip (per-chip batch / XLA's step time). Chips whose cost model
   gives no step time (v5e, v6e: a negative `optimal_seconds`) cannot be ranked by an
   estimate; they are ordered by the largest per-chip batch (it amortises the per-step work:
   the optimizer update, the weight all-gathers), then by how little the remat policy
   recomputes (`RECOMPUTE_ORDER`), and marked as such.

Every compile's figures go to a results file (JSON lines, rewritten whole through a temporary
file): a rerun of the same request reads them back and compiles only what is missing, so an
interrupted search resumes. Compiles run in worker processes, as many at a time as the host's
available memory holds (`COMPILE_HOST_BYTES` per compile, `default_jobs`), or in this process
for one at a time; a time budget stops new compiles, and the ranking covers what finished.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import multiprocessing
import os
import threading
import time

from uniimage_jax.bench import aot, step_arguments, topologies
from uniimage_jax.train.compiled_memory import format_bytes

GIB = 1024 ** 3
# Peak host memory of one compile of a preset's training step (measured on this project's
# hosts: 4.5-10.5 GiB for tbac_3b); what `default_jobs` divides the available memory by.
COMPILE_HOST_BYTES = {"tiny": int(1.5 * GIB), "tbac_3b": 10 * GIB}
# Remat policies from the least recomputation to the most (the tie-break without a step time).
RECOMPUTE_ORDER = ("none", "dots_saveable", "dots_no_batch_saveable", "save_attention_outputs",
                   "full")
DEFAULT_DIT_REMAT = ("none", "dots_saveable", "full")
# The per-chip batch granule costed beside a layout's largest batch. TPU layouts tile arrays in
# blocks of 8 x 128, so a batch between multiples of 8 can be padded in the dimensions it leads;
# whatever the cause in a given program, XLA's estimate says when it costs: tbac_3b t2i on v5p-8
# (fsdp=4, cached latents, 384-token prompts) is est. 55.1 samples/s per chip at its largest batch
# under 40 GiB, 17, and 56.9 at 16.
ROUND_BATCH = 8
DEFAULT_MLLM_REMAT = ("none",)   # its backward runs over the metaquery tokens only


@dataclasses.dataclass(frozen=True)
class Layout:
    data: int
    fsdp: int
    tensor: int
    dit_remat: str
    mllm_remat: str
    frozen_sharding: str

    @property
    def key(self) -> str:
        return (f"data={self.data},fsdp={self.fsdp},tensor={self.tensor} "
                f"dit_remat={self.dit_remat} mllm_remat={self.mllm_remat} "
                f"frozen={self.frozen_sharding}")

    def overrides(self) -> list[str]:
        return [f"mesh.data={self.data}", f"mesh.fsdp={self.fsdp}", f"mesh.tensor={self.tensor}",
                f"model.dit_remat={self.dit_remat}", f"model.mllm_remat={self.mllm_remat}",
                f"frozen_sharding={self.frozen_sharding}"]


@dataclasses.dataclass(frozen=True)
class Request:
    """What every compile of a search shares (plain values: it crosses to worker processes)."""
    topology: str
    preset: str
    task: str
    config_file: str | None
    overrides: tuple[str, ...]
    prompt_tokens: int
    latents: bool

    def fingerprint(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    def config(self, layout: Layout):
        config = aot.stage_config(self.preset, self.task, self.config_file, self.overrides)
        for item in layout.overrides():
            aot.apply_override(config, item)
        return config

    @property
    def inputs(self) -> aot.StepInputs:
        return aot.StepInputs(self.prompt_tokens, self.latents)


@dataclasses.dataclass
class Options:
    budget_bytes: int | None = None     # per chip; None: the chip's HBM
    min_batch: int = 1
    max_batch: int = 256
    time_budget_s: float | None = None
    jobs: int | None = None             # None: `default_jobs`
    meshes: tuple | None = None         # ((data, fsdp, tensor), ...); None: every valid split
    dit_remat: tuple = DEFAULT_DIT_REMAT
    mllm_remat: tuple = DEFAULT_MLLM_REMAT
    frozen_sharding: tuple = ("tensor", "replicated")
    cost: bool = True


# ------------------------------------------------------------------------------- candidates


def head_counts(model_config) -> tuple[int, ...]:
    m, d = model_config.mllm, model_config.dit
    return (m.num_attention_heads, m.num_key_value_heads, d.num_attention_heads,
            d.num_cross_attention_heads)


def mesh_splits(devices: int, heads) -> list[tuple[int, int, int]]:
    """Every (data, fsdp, tensor) that multiplies to `devices` with tensor dividing each of
    `heads`."""
    out = []
    for tensor in range(1, devices + 1):
        if devices % tensor or any(h % tensor for h in heads):
            continue
        rest = devices // tensor
        out += [(rest // fsdp, fsdp, tensor) for fsdp in range(1, rest + 1) if rest % fsdp == 0]
    return out


def candidate_layouts(model_config, devices: int, options: Options) -> list[Layout]:
    meshes = options.meshes or mesh_splits(devices, head_counts(model_config))
    out = []
    for data, fsdp, tensor in meshes:
        frozen = options.frozen_sharding if tensor > 1 else options.frozen_sharding[:1]
        out += [Layout(data, fsdp, tensor, d, m, f) for d in options.dit_remat
                for m in options.mllm_remat for f in frozen]
    return out


def argument_bytes(request: Request, layout: Layout, per_chip_batch: int) -> int:
    """Per-chip bytes of the layout's step arguments (`step_arguments.argument_bytes`)."""
    return step_arguments.argument_bytes(request.config(layout), request.topology,
                                         per_chip_batch, request.inputs)["total"]


# ---------------------------------------------------------------------------- compiling


def compile_record(request: Request, layout: Layout, batch: int, kind: str) -> dict:
    """One compile as a results-file record: "memory" (the step as configured) or "cost" (its
    full-depth cost figures)."""
    aot.use_host_cpu()
    topology = topologies.get(request.topology)
    config = request.config(layout)
    record = {"request": request.fingerprint(), "layout": layout.key, "batch": batch,
              "kind": kind}
    t0 = time.perf_counter()
    if kind == "memory":
        figures, _ = aot.compile_request(topology, config, request.task, batch, request.inputs)
        record.update(memory=figures.memory, needed_bytes=figures.needed_bytes)
        if not config.model.scan_layers:   # unrolled: its own cost figures are whole
            record["cost"] = figures.cost
    else:
        record["cost"] = aot.depth_extrapolated_cost(topology, config, request.task, batch,
                                                     request.inputs)
    record["compile_s"] = time.perf_counter() - t0
    return record


def default_jobs(preset: str) -> int:
    """Compiles at a time that the host's available memory holds (at least one)."""
    return max(1, min(os.cpu_count() or 1, available_host_bytes() // COMPILE_HOST_BYTES[preset]))


def available_host_bytes() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


class Results:
    """The results file: one JSON record per compile, rewritten whole through a temporary
    file after each record (an interrupted search leaves the file of its last finished
    compile). Records of other requests in the same file are kept and ignored."""

    def __init__(self, path: str | None, request: Request):
        self.path, self.fingerprint = path, request.fingerprint()
        self.records: list[dict] = []
        self.lock = threading.Lock()
        if path and os.path.exists(path):
            with open(path) as f:
                for number, line in enumerate(f, 1):
                    try:
                        self.records.append(json.loads(line))
                    except json.JSONDecodeError:
                        raise aot.AotError(f"--results {path}:{number}: not a JSON record") \
                            from None

    def get(self, layout: Layout, batch: int, kind: str) -> dict | None:
        return next((r for r in self.records if r.get("request") == self.fingerprint and
                     r["layout"] == layout.key and r["batch"] == batch and r["kind"] == kind),
                    None)

    def add(self, record: dict) -> None:
        with self.lock:
            self.records.append(record)
            if not self.path:
                return
            tmp = f"{self.path}.tmp{os.getpid()}"
            with open(tmp, "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in self.records)
            os.replace(tmp, self.path)


class BudgetSpent(Exception):
    """The time budget ran out before a compile could start."""


class Compiler:
    """Compiles through the results file: a record already there is returned as is; otherwise
    it compiles (in this process, or in a worker process when `jobs` > 1: each compile in a
    fresh process, so the host memory of one is returned before the next)."""

    def __init__(self, request: Request, results: Results, jobs: int, deadline: float | None,
                 log):
        self.request, self.results, self.deadline, self.log = request, results, deadline, log
        self.pool = None
        if jobs > 1:
            self.pool = concurrent.futures.ProcessPoolExecutor(
                jobs, mp_context=multiprocessing.get_context("spawn"), max_tasks_per_child=1)
        self.compiled = 0

    def run(self, layout: Layout, batch: int, kind: str) -> dict:
        record = self.results.get(layout, batch, kind)
        if record is not None:
            return record
        if self.deadline is not None and time.monotonic() > self.deadline:
            raise BudgetSpent
        if self.pool is None:
            record = compile_record(self.request, layout, batch, kind)
        else:
            record = self.pool.submit(compile_record, self.request, layout, batch, kind).result()
        self.compiled += 1
        self.results.add(record)
        what = ("cost" if kind == "cost" else
                format_bytes(record["memory"]["total"]) if record["memory"] else
                f"does not fit (needs at least {format_bytes(record['needed_bytes'])})")
        self.log(f"[search] {layout.key} batch {batch}: {what} ({record['compile_s']:.0f} s)")
        return record

    def close(self):
        if self.pool is not None:
            self.pool.shutdown(cancel_futures=True)


def _figures(record: dict) -> aot.Compiled:
    return aot.Compiled(record["memory"], record["needed_bytes"], record.get("cost"),
                        record["compile_s"])


def _arguments(request, layout, options, results: Results) -> dict:
    """The layout's exact argument bytes per chip (kept in the results file like a compile)."""
    record = results.get(layout, options.min_batch, "arguments")
    if record is None:
        record = {"request": request.fingerprint(), "layout": layout.key,
                  "batch": options.min_batch, "kind": "arguments",
                  "argument_bytes": argument_bytes(request, layout, options.min_batch)}
        results.add(record)
    return {"layout": layout, "argument_bytes": record["argument_bytes"]}


def _largest_batch(request, out, options, cap, compiler, topology) -> dict:
    """The layout's memory outcome: its largest per-chip batch within `cap` (>= min_batch),
    or why it has none."""
    layout = out["layout"]
    if out["argument_bytes"] > cap:
        return {**out, "status": f"arguments alone need {format_bytes(out['argument_bytes'])}"}
    tried = {}

    def compile_fn(batch):
        record = compiler.run(layout, batch, "memory")
        return _figures(record), record
    try:
        first = compile_fn(options.min_batch)
        tried[options.min_batch] = first
        if first[0].memory is None or first[0].memory["total"] > cap:
            return {**out, "status": f"per-chip batch {options.min_batch} does not fit"}
        start = max(options.min_batch, aot.DEFAULT_PER_CHIP_BATCH[request.task])
        best, figures, record = aot.find_max_batch(
            topology, None, request.task, min(start, options.max_batch), request.inputs,
            log=lambda s: None, max_batch=options.max_batch, tried=tried, cap=cap,
            compile_fn=compile_fn)
    except BudgetSpent:
        return {**out, "status": "not finished (time budget)"}
    return {**out, "status": "fits", "batch": best, "memory": record["memory"],
            "cost": record.get("cost")}


def _cost_batches(largest: int, options) -> list[int]:
    """The per-chip batches a fitting layout is costed at: its largest and, if that is not a
    multiple of ROUND_BATCH, the largest multiple below it (when >= min_batch)."""
    rounded = largest - largest % ROUND_BATCH
    return [largest] if rounded == largest or rounded < options.min_batch else [largest, rounded]


def _rate(outcome) -> float:
    seconds = outcome["cost"]["optimal_seconds"] if outcome.get("cost") else 0.0
    return outcome["batch"] / seconds if seconds > 0 else 0.0


def _with_cost(outcome, compiler, options, cap: int) -> dict:
    """The fitting layout costed at `_cost_batches`, as the faster per chip of them (its
    largest batch kept as "largest_batch"; a smaller batch whose memory, against the usual
    growth, is over `cap` is not a candidate)."""
    if outcome["status"] != "fits" or not options.cost:
        return outcome
    layout, largest = outcome["layout"], outcome["batch"]
    best = None
    for batch in _cost_batches(largest, options):
        candidate = {**outcome, "largest_batch": largest}
        try:
            if batch != largest:   # its own memory and figures
                record = compiler.run(layout, batch, "memory")
                if record["memory"] is None or record["memory"]["total"] > cap:
                    continue
                candidate.update(batch=batch, memory=record["memory"], cost=record.get("cost"))
            if candidate["cost"] is None:
                candidate["cost"] = compiler.run(layout, batch, "cost")["cost"]
        except BudgetSpent:
            if best is None:
                return {**outcome, "cost_status": "not compiled (time budget)"}
            break
        if best is None or _rate(candidate) > _rate(best):
            best = candidate
    return best


def _each(fn, items, jobs: int) -> list:
    """fn over items, `jobs` at a time (their compiles wait on the Compiler's workers)."""
    if jobs <= 1:
        return [fn(x) for x in items]
    with concurrent.futures.ThreadPoolExecutor(max(1, len(items))) as threads:
        return list(threads.map(fn, items))


def search(request: Request, options: Options, results_path: str | None = None,
           log=print) -> dict:
    """Search the layouts of `request` (see the module docstring); returns the ranked rows
    (best first: only layouts that fit are ranked), the rows of those that do not fit and
    the count of compiles run now."""
    from uniimage_jax.train import stage_setup

    aot.use_host_cpu()
    topology = topologies.get(request.topology)
    base = aot.stage_config(request.preset, request.task, request.config_file, request.overrides)
    model = stage_setup.validate(base)
    per_sample = aot.analytic_flops_per_sample(base, model, request.task, request.inputs)
    cap = min(options.budget_bytes or topology.hbm_bytes_per_device,
              topology.hbm_bytes_per_device)
    layouts = candidate_layouts(model.config, len(topology.devices), options)
    jobs = options.jobs or default_jobs(request.preset)
    deadline = None if options.time_budget_s is None else \
        time.monotonic() + options.time_budget_s
    log(f"[search] {len(layouts)} layouts of {request.preset} {request.task} on "
        f"{topology.name}, per-chip budget {format_bytes(cap)}, {jobs} compile(s) at a time")
    results = Results(results_path, request)
    if not topology.chip.xla_step_time and options.cost:
        log(f"[search] XLA's cost model gives {topology.chip.family} no step time: no cost "
            "compiles; layouts rank by their largest batch, then by how little they recompute")
        options = dataclasses.replace(options, cost=False)
    compiler = Compiler(request, results, jobs, deadline, log)
    try:
        outcomes = [_arguments(request, lay, options, results) for lay in layouts]
        outcomes = _each(lambda o: _largest_batch(request, o, options, cap, compiler, topology),
                         outcomes, jobs)
        # The most promising first, so that a time budget leaves them costed.
        outcomes.sort(key=lambda o: (o["status"] != "fits", -o.get("batch", 0),
                                     RECOMPUTE_ORDER.index(o["layout"].dit_remat)))
        outcomes = _each(lambda o: _with_cost(o, compiler, options, cap), outcomes, jobs)
    finally:
        compiler.close()
    rows = [_row(o, topology, per_sample) for o in outcomes]
    ranked = sorted((r for r in rows if r["fits"]), key=_rank_key)
    return {"topology": topology.name, "devices": len(topology.devices),
            "preset": request.preset, "task": request.task,
            "prompt_tokens": request.prompt_tokens, "latents": request.latents,
            "budget_bytes": cap, "ranked": ranked,
            "not_fitting": [r for r in rows if not r["fits"]], "compiled_now": compiler.compiled}


def _row(outcome: dict, topology, per_sample: float) -> dict:
    layout: Layout = outcome["layout"]
    row = {"layout": layout.key, "mesh": {"data": layout.data, "fsdp": layout.fsdp,
                                          "tensor": layout.tensor},
           "dit_remat": layout.dit_remat, "mllm_remat": layout.mllm_remat,
           "frozen_sharding": layout.frozen_sharding, "status": outcome["status"],
           "fits": outcome["status"] == "fits", "argument_bytes": outcome["argument_bytes"]}
    if not row["fits"]:
        return row
    batch, cost = outcome["batch"], outcome.get("cost")
    step_s = cost["optimal_seconds"] if cost and cost["optimal_seconds"] > 0 else None
    row.update(per_chip_batch=batch, largest_per_chip_batch=outcome.get("largest_batch", batch),
               hbm_bytes_per_chip=outcome["memory"]["total"],
               memory_bytes=outcome["memory"],
               xla_flops_per_sample=cost["flops"] / batch if cost else None,
               estimated_step_s=step_s,
               estimated_samples_per_s_per_chip=batch / step_s if step_s else None,
               estimated_mfu=(per_sample * batch / step_s / topology.peak_flops_per_device
                              if step_s else None),
               cost_status=outcome.get("cost_status", "compiled" if cost else "not compiled"))
    return row


def _rank_key(row: dict):
    """Estimated samples/s per chip, best first; rows without one after them, by the largest
    per-chip batch, then the least recomputation."""
    rate = row["estimated_samples_per_s_per_chip"]
    recompute = (RECOMPUTE_ORDER.index(row["dit_remat"]), RECOMPUTE_ORDER.index(row["mllm_remat"]))
    return (rate is None, -(rate or 0.0), -row["per_chip_batch"], recompute, row["layout"])
