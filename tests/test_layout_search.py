"""`uniimage-bench --aot TOPOLOGY --search`: the layout search ranks what it compiled by XLA's
est. samples/s per chip, never ranks a layout over the memory budget, resumes from its results
file, and stops starting compiles when its time budget is spent. One real search of the tiny
preset (three compiles), then the ranking rules on recorded figures."""
import json

import pytest

pytest.importorskip("libtpu", reason='TPU-topology compiles need the [aot] extra: '
                    'pip install -e ".[aot]"')

from uniimage_jax.bench import layout_search as search_lib  # noqa: E402
from uniimage_jax.bench import search_report  # noqa: E402
from uniimage_jax.cli.bench import main  # noqa: E402

MIB = 2 ** 20


# The tiny preset cut to one MLLM layer and one DiT block: the search compiles it a few times.
SMALL = ("model.mllm.num_hidden_layers=1", "model.dit.num_layers=1")


def _request(**kw):
    return search_report.parse_request("v5p:2x2x1", preset="tiny", task="t2i", overrides=SMALL,
                                    prompt_tokens=32, latents=True, **kw)


def _records(path, kind="memory"):
    with open(path) as f:
        return [r for r in map(json.loads, f) if r["kind"] == kind]


def _rate(record):
    return record["batch"] / record["cost"]["optimal_seconds"]


def test_tiny_search_ranks_what_it_compiled_and_never_a_layout_that_does_not_fit(tmp_path):
    results = str(tmp_path / "search.jsonl")
    request, options = _request(meshes="data=4;fsdp=4", dit_remat="none", max_batch=1, jobs=1)
    first = search_lib.search(request, options, results, log=lambda s: None)
    compiled = _records(results)
    assert first["compiled_now"] == len(compiled) == 2
    assert [r["layout"] for r in first["ranked"]] == [
        r["layout"] for r in sorted(compiled, key=_rate, reverse=True)]

    # The same results with a memory budget that leaves out the best-ranked layout: the rerun
    # compiles nothing and ranks only the layouts under the budget, the best of them first.
    best = max(compiled, key=_rate)
    budget = best["memory"]["total"] - 1
    under = [r for r in compiled if r["memory"]["total"] <= budget]
    request, options = _request(meshes="data=4;fsdp=4", dit_remat="none", max_batch=1, jobs=1,
                                hbm_budget_gib=budget / 2 ** 30)
    second = search_lib.search(request, options, results, log=lambda s: None)
    assert second["compiled_now"] == 0
    assert [r["layout"] for r in second["ranked"]] == [
        r["layout"] for r in sorted(under, key=_rate, reverse=True)]
    assert all(r["hbm_bytes_per_chip"] <= budget for r in second["ranked"])
    assert best["layout"] in [r["layout"] for r in second["not_fitting"]]
    if second["ranked"]:
        lines = search_report.describe(second, request)
        assert f"--config.batch_size={4 * second['ranked'][0]['per_chip_batch']}" in lines[-1]


def _fake(monkeypatch, memory_mib, step_s):
    """Compiles replaced by figures: memory_mib(layout, batch) and step_s(layout, batch)."""
    calls = []

    def compile_record(request, layout, batch, kind):
        calls.append((layout.key, batch, kind))
        total = int(memory_mib(layout, batch) * MIB)
        fits = total <= 95 * 2 ** 30
        return {"request": request.fingerprint(), "layout": layout.key, "batch": batch,
                "kind": kind, "memory": {"total": total} if fits else None,
                "needed_bytes": None if fits else total,
                "cost": {"flops": 1e12 * batch, "bytes accessed": 1.0,
                         "optimal_seconds": step_s(layout, batch)}, "compile_s": 0.0}
    monkeypatch.setattr(search_lib, "compile_record", compile_record)
    monkeypatch.setattr(search_lib, "argument_bytes", lambda request, layout, batch: 1)
    return calls


def test_without_a_step_time_layouts_rank_by_batch_then_recompute(monkeypatch):
    """v5e / v6e: XLA's cost model gives no step time; the largest per-chip batch ranks first,
    then the policy that recomputes less."""
    per_sample = {"none": 3.0, "dots_saveable": 2.0, "full": 1.0}
    _fake(monkeypatch, lambda lay, b: 10 + per_sample[lay.dit_remat] * b, lambda lay, b: -1.0)
    request, options = _request(meshes="fsdp=4", max_batch=64, hbm_budget_gib=40 / 1024, jobs=1)
    result = search_lib.search(request, options, log=lambda s: None)
    ranked = [(r["dit_remat"], r["per_chip_batch"]) for r in result["ranked"]]
    assert ranked == [("full", 30), ("dots_saveable", 15), ("none", 10)], ranked
    assert all(r["estimated_step_s"] is None for r in result["ranked"])


def test_per_chip_throughput_ranks_not_the_step_time(monkeypatch):
    """A larger batch with a longer step can be the faster layout per chip."""
    cap_batch = {"none": 8, "full": 32}
    _fake(monkeypatch, lambda lay, b: 10 + 30 * b / cap_batch[lay.dit_remat],
          lambda lay, b: 0.02 + b * {"none": 0.01, "full": 0.0085}[lay.dit_remat])
    request, options = _request(meshes="fsdp=4", dit_remat="none,full", max_batch=64,
                                hbm_budget_gib=40 / 1024, jobs=1)
    ranked = search_lib.search(request, options, log=lambda s: None)["ranked"]
    assert [(r["dit_remat"], r["per_chip_batch"]) for r in ranked] == [("full", 32), ("none", 8)]
    assert ranked[0]["estimated_step_s"] > ranked[1]["estimated_step_s"]


def test_a_largest_batch_between_tiles_is_costed_beside_the_tile_below(monkeypatch):
    """Per-chip batches padded to the TPU's tiles of 8 (the cost of 17 is that of 24): the
    largest that fits, 17, is costed and so is 16, which is faster per chip and ranks."""
    calls = _fake(monkeypatch, lambda lay, b: 10 + b,
                  lambda lay, b: 0.01 + 0.001 * -(-b // search_lib.ROUND_BATCH) * 8)
    request, options = _request(meshes="fsdp=4", dit_remat="none", max_batch=64,
                                hbm_budget_gib=27 / 1024, jobs=1)
    result = search_lib.search(request, options, log=lambda s: None)
    (row,) = result["ranked"]
    assert (row["per_chip_batch"], row["largest_per_chip_batch"]) == (16, 17)
    assert row["hbm_bytes_per_chip"] == 26 * MIB
    assert {(b, k) for _, b, k in calls} >= {(17, "memory"), (18, "memory"), (16, "memory")}
    assert "16 (largest 17: est. slower per chip)" in search_report.describe(result, request)[2]
    # A largest batch on a tile is costed alone.
    calls.clear()
    request, options = _request(meshes="fsdp=4", dit_remat="none", max_batch=64,
                                hbm_budget_gib=26 / 1024, jobs=1)
    (row,) = search_lib.search(request, options, log=lambda s: None)["ranked"]
    assert (row["per_chip_batch"], row["largest_per_chip_batch"]) == (16, 16)


def test_time_budget_stops_new_compiles(monkeypatch):
    calls = _fake(monkeypatch, lambda lay, b: 10 + b, lambda lay, b: 1.0)
    request, options = _request(meshes="fsdp=4", time_budget_min=1e-9, jobs=1)
    result = search_lib.search(request, options, log=lambda s: None)
    assert calls == [] and result["ranked"] == []
    assert {r["status"] for r in result["not_fitting"]} == {"not finished (time budget)"}


@pytest.mark.parametrize("argv, message", [
    (["--task", "sample"], "--search ranks training-step layouts"),
    (["--mesh", "fsdp=4"], "--search chooses the mesh"),
    (["--meshes", "fsdp=3"], "--meshes 'fsdp=3': 3 devices"),
    (["--dit-remat", "most"], "--dit-remat 'most': expected a comma-separated list"),
    (["--min-per-chip-batch", "8", "--max-per-chip-batch", "4"], "need 1 <= min <= max"),
])
def test_bad_search_requests_are_one_line_errors(capsys, argv, message):
    assert main(["--aot", "v5p:2x2x1", "--preset", "tiny", "--search", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
