"""Shared test setup: fp32 parity at the highest matmul precision, quiet single-threaded torch."""
import os
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# The tests run on the CPU; with libtpu installed (the [aot] extra, for ahead-of-time TPU
# compiles) JAX would otherwise look for a TPU first.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# A persistent XLA compilation cache shared by the test processes and the subprocesses they start
# (training runs, fake-device runs): the same tiny programs are compiled once per machine. Every
# program is kept, however quick to compile: each of the dozens of subprocesses would otherwise
# compile the same hundreds of small ones (initialisers, eager operations) again, and loading one
# costs less than compiling it.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(tempfile.gettempdir(), "uniimage_jax_test_xla_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
import tests.xla_env  # noqa: E402,F401  (XLA_FLAGS: cheaper CPU compiles, before JAX starts)

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

try:
    import torch  # noqa: E402

    torch.set_num_threads(1)
    torch.backends.cuda.matmul.allow_tf32 = False
except ImportError:  # torch is a test extra; tests that need it import it themselves
    pass


def pytest_configure(config):
    # The installed JAX deprecates entering a mesh with `with mesh:`; the project uses
    # `jax.set_mesh`. Any code path that goes back to the old form fails the tests it runs in.
    # (The message, "`with mesh:` context manager has been deprecated ...", holds a colon, which
    # the filter syntax reserves: "." stands for it.)
    config.addinivalue_line("filterwarnings",
                            "error:.with mesh.. context manager has been deprecated"
                            ":DeprecationWarning")


@pytest.fixture(scope="session")
def quick_demo_run(tmp_path_factory):
    """`uniimage-demo --quick`, run once per test session for all workers, as the README's demo
    block runs it (`run_demo_block` of tests/test_readme.py: {"dir": the checkout holding
    ./uniimage_demo, "returncode", "stdout", "stderr"}). The README, demo, report and app tests
    all look at this one run; a test that writes into a demo folder copies it first."""
    from tests.shared_runs import made_once
    from tests.test_readme import run_demo_block

    return made_once(tmp_path_factory, "quick_demo", run_demo_block)


@pytest.fixture(scope="session")
def gcs_bucket():
    """A local Cloud Storage emulator for this test process (each pytest-xdist worker starts its
    own: in memory, about a second), its bucket's URL `gs://uniimage-test`. The environment that
    points gcsfs, epath and tensorstore at it is set for the rest of the session, so the test's
    own clients and every subprocess it starts reach the emulator. Give each test its own prefix
    (`gs://uniimage-test/<test name>/...`); `gcs_bucket.emulator.fail(...)` injects faults."""
    from uniimage_jax.storage.emulator import GcsEmulator

    emulator = GcsEmulator(buckets=["uniimage-test"]).start()
    os.environ.update(emulator.client_env())

    class Bucket(str):
        pass

    bucket = Bucket("gs://uniimage-test")
    bucket.emulator = emulator
    yield bucket
    emulator.stop()


def _train_tiny_t2i_stage(folder: str) -> dict:
    """`uniimage-train` with the README's tiny recipe (`configs/t2i_pretrain.py:tiny`), 3 steps
    (`tests.test_train.REFERENCE_RUN`): the one-process run the multi-device and multi-process
    training tests compare with, and a tiny stage to sample, report and convert."""
    import subprocess

    from tests.test_train import REFERENCE_RUN, ROOT, _train_cmd

    p = subprocess.run(_train_cmd(folder, *REFERENCE_RUN), cwd=ROOT, capture_output=True,
                       text=True, timeout=900)
    if p.returncode != 0:
        raise RuntimeError(f"the tiny reference run failed:\n{p.stderr[-3000:]}")
    return {"stage": os.path.join(folder, "t2i_pretrain"), "workdir": folder}


@pytest.fixture(scope="session")
def tiny_t2i_stage(tmp_path_factory):
    """{"stage": a `configs/t2i_pretrain.py:tiny` stage directory trained 3 steps by the CLI,
    "workdir": the folder holding it and its tiny_processor}, made once per test session for all
    workers. Shared: a test that writes into it copies it first."""
    from tests.shared_runs import made_once

    return made_once(tmp_path_factory, "tiny_t2i_stage", _train_tiny_t2i_stage)
