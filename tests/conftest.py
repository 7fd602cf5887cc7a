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
# (training runs, fake-device runs): the same tiny programs are compiled once per machine.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(tempfile.gettempdir(), "uniimage_jax_test_xla_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "1")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

try:
    import torch  # noqa: E402

    torch.set_num_threads(1)
    torch.backends.cuda.matmul.allow_tf32 = False
except ImportError:  # torch is a test extra; tests that need it import it themselves
    pass
