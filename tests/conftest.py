"""Shared test setup: fp32 parity at the highest matmul precision, quiet single-threaded torch."""
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

try:
    import torch  # noqa: E402

    torch.set_num_threads(1)
    torch.backends.cuda.matmul.allow_tf32 = False
except ImportError:  # torch is a test extra; tests that need it import it themselves
    pass
