"""What a pod run survives (issue 27): the rehearsal's scenarios as tests, plus the pieces they
rest on that can be checked without processes.

The scenarios run as `uniimage-rehearse` runs them (`uniimage_jax/rehearsal/scenarios.py`): one
job of 2 processes x 2 CPU devices on the tiny preset, its workdir on this worker's Cloud Storage
emulator, played once for the module; each test asserts its scenario's verdict and figures.
"""
import numpy as np
import pytest

from uniimage_jax.data.iterator_state import deal_again
from uniimage_jax.data.pipeline import default_data_config, make_train_iterator


def _iterators(count, global_batch=8):
    cfg = default_data_config("t2i")
    cfg.source, cfg.synthetic_num_samples, cfg.read_threads = "synthetic", 40, 0
    return [make_train_iterator(cfg, task="t2i", batch_size=global_batch // count, seed=1,
                                process_index=p, process_count=count, image_size=32)
            for p in range(count)]


def test_iterator_states_of_four_processes_continue_the_global_batches_on_two_and_one():
    four = _iterators(4)
    for it in four:
        for _ in range(6):  # 48 examples of 40: into the second epoch
            next(it)
    saved = [it.get_state() for it in four]
    single = _iterators(1)[0]
    expected = [next(single) for _ in range(8)][6:]  # the 7th and 8th global batches
    for count in (2, 1):
        its = _iterators(count)
        for p, it in enumerate(its):
            it.set_state(deal_again(saved, global_batch=8, process_index=p, process_count=count))
        for whole in expected:
            parts = [next(it) for it in its]
            np.testing.assert_array_equal(whole["index"],
                                          np.concatenate([b["index"] for b in parts]))
            np.testing.assert_array_equal(whole["target"],
                                          np.concatenate([b["target"] for b in parts]))


def test_uneven_positions_resume_at_the_next_whole_batch_with_every_skipped_example(caplog):
    # Process 1 met an unreadable example in round 4 and read one element further: the run
    # resumes after round 4 on every process (never an example twice) and keeps both skip logs.
    states = [{"parent": {"next_index": 6}, "skipped": {}},
              {"parent": {"next_index": 7}, "skipped": {"13": ["b.png", "truncated"]}},
              {"parent": {"next_index": 6}, "skipped": {"2": ["a.png", "empty"]}},
              {"parent": {"next_index": 6}, "skipped": {}}]
    new = deal_again(states, global_batch=8, process_index=1, process_count=2)
    assert new == {"parent": {"next_index": 16},
                   "skipped": {"2": ["a.png", "empty"], "13": ["b.png", "truncated"]}}
    assert "resuming at the next whole global batch (4)" in caplog.text
    with pytest.raises(ValueError, match="does not divide over 3 processes"):
        deal_again(states, global_batch=8, process_index=0, process_count=3)
    with pytest.raises(ValueError, match="saved with data.worker_count > 0"):
        deal_again([{"parent": {"workers_state": {}}}], global_batch=8, process_index=0,
                   process_count=2)


# ----------------------------------------------------------------------------- the scenarios
HEARTBEAT_S = 10
EVERY = 2


@pytest.fixture(scope="module")
def verdicts(gcs_bucket, tmp_path_factory):
    """The rehearsal, played once: 2 processes x 2 devices, the workdir on this worker's
    emulator, the bucket failing for 3 s three times (long enough for several retries of every
    client: the request counts are asserted)."""
    from uniimage_jax.rehearsal.processes import Layout
    from uniimage_jax.rehearsal.scenarios import Rehearsal, Settings

    logs = tmp_path_factory.mktemp("rehearsal_logs")
    settings = Settings(root=f"{gcs_bucket}/rehearsal", log_dir=str(logs), layout=Layout(2, 2),
                        max_steps=12, every_steps=EVERY, heartbeat_s=HEARTBEAT_S, fault_s=3.0,
                        emulator=gcs_bucket.emulator)
    return Rehearsal(settings).run(report=print)


def test_a_sigterm_to_every_process_saves_one_step_exits_42_and_resumes_bitwise(verdicts):
    v = verdicts["a"]
    assert v.passed, v.line()
    assert v.facts["codes"] == [42, 42]  # "restart me", from both
    assert v.facts["stopped"] >= 2 and v.steps_lost == 0
    assert v.identical == "yes (bitwise)"


def test_c_a_bucket_answering_503_then_429_during_saves_is_ridden_out(verdicts):
    v = verdicts["c"]
    assert v.passed, v.line()
    assert v.facts["data_faults"] > 0 and all(v.facts["save_faults"])  # every window failed some
    assert len(v.facts["faulted_saves"]) == 2 and v.identical == "yes (bitwise)"


def test_b_a_killed_process_ends_the_others_within_the_heartbeat_timeout(verdicts):
    v = verdicts["b"]
    assert v.passed, v.line()
    victim = v.facts["victim"]
    survivors = [c for i, c in enumerate(v.facts["codes"]) if i != victim]
    assert survivors == [-6]  # SIGABRT: JAX's coordination service ended it (status 134)
    assert v.detect_s <= HEARTBEAT_S + 20, v.detect_s
    assert v.steps_lost <= EVERY + 1  # the steps since the last committed checkpoint


def test_e_a_half_written_step_is_never_restored_and_is_saved_over(verdicts):
    v = verdicts["e"]
    assert v.passed, v.line()


def test_d_a_restart_on_fewer_processes_continues_the_global_batches(verdicts):
    v = verdicts["d"]
    assert v.passed, v.line()
    assert v.facts["positions"] == [12 * 8]  # one process: all 12 global batches of 8 read
    assert v.identical == "yes (within 1e-5)"


AGREEMENT_WORKER = r'''
import sys, time
from uniimage_jax.train import distributed
pid = int(sys.argv[1])
distributed.maybe_initialize_distributed()
print("rounds", distributed.any_process("stop", pid == 1), distributed.any_process("stop", False),
      flush=True)
if pid == 0:
    start = time.time()
    try:
        distributed.barrier("lonely")
    except distributed.PeerTimeoutError as e:
        print(f"timed out after {time.time() - start:.1f} s: {e}", flush=True)
    time.sleep(120)  # as if blocked in a collective: only the heartbeat timeout can end this
else:
    time.sleep(8)  # a process stuck elsewhere (on storage, say), its heartbeats going on
    distributed.fail_fast(3, "process 1 failed: boom")
'''


def test_processes_agree_and_a_barrier_or_a_failed_process_ends_the_others_in_bounded_time():
    import os
    import subprocess
    import sys
    import time

    from uniimage_jax.rehearsal.processes import ROOT, free_port

    env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_NUM_PROCESSES": "2",
           "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{free_port()}", "PYTHONPATH": ROOT,
           "UNIIMAGE_BARRIER_TIMEOUT_S": "3", "UNIIMAGE_HEARTBEAT_TIMEOUT_S": "5"}
    procs = [subprocess.Popen([sys.executable, "-c", AGREEMENT_WORKER, str(i)],
                              env={**env, "JAX_PROCESS_ID": str(i)}, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
             for i in range(2)]
    ended = [None, None]
    deadline = time.time() + 300
    while None in ended and time.time() < deadline:
        for i, p in enumerate(procs):
            if ended[i] is None and p.poll() is not None:
                ended[i] = time.time()
        time.sleep(0.05)
    for p in procs:
        if p.poll() is None:
            p.kill()
    out = [p.communicate()[0] for p in procs]
    assert all("rounds True False" in o for o in out), out  # one process's flag reaches all
    found = [line for line in out[0].splitlines() if line.startswith("timed out after")]
    assert found and "process(es) 1 of 2 did not reach 'lonely' within 3 s" in found[0], out[0]
    assert float(found[0].split()[3]) < 8  # the barrier's timeout, not process 1's return
    # Process 1 fails and leaves at once; JAX's coordination service then ends process 0 (its
    # 120 s wait cut short) within the heartbeat timeout, naming process 1.
    assert procs[1].returncode == 3 and "boom" in out[1] and "leaving at once" in out[1], out[1]
    assert procs[0].returncode == -6, out[0]  # SIGABRT: exit status 134
    assert ended[0] - ended[1] < 5 + 20, ended
    assert "stopped sending heartbeats):\n1" in out[0], out[0][-2000:]


def test_what_another_process_writes_on_the_bucket_is_seen(gcs_bucket):
    """gcsfs would remember a listing for the life of the process: another host's new step (or
    shard, or lock) would stay invisible to exists(), iterdir() and Orbax's list of steps."""
    import os
    import subprocess
    import sys

    from orbax.checkpoint import utils

    from uniimage_jax import storage
    from uniimage_jax.rehearsal.processes import ROOT

    stage = f"{gcs_bucket}/another_process/stage"
    storage.write_text(f"{stage}/1/commit_success.txt", "1")
    assert utils.checkpoint_steps(stage) == [1]
    subprocess.run([sys.executable, "-c", "import sys; from uniimage_jax import storage; "
                    "storage.write_text(sys.argv[1] + '/2/commit_success.txt', '2')", stage],
                   check=True, env={**os.environ, "PYTHONPATH": ROOT})
    assert storage.exists(f"{stage}/2/commit_success.txt")
    assert sorted(p.name for p in storage.path(stage).iterdir()) == ["1", "2"]
    assert sorted(utils.checkpoint_steps(stage)) == [1, 2]
