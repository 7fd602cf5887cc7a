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
