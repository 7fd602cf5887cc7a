"""uniimage_jax: TBAC-UniImage in JAX/Flax.

Subpackages: models (Qwen2.5-VL, SANA, DC-AE, the unified model), convert (strict PyTorch ->
Flax conversion), processing (prompts, tokenizer, image preprocessing), data, train, sampling,
eval, storage (local and gs:// files).
"""

__version__ = "0.1.0"

import os as _os

# gs:// paths go through gcsfs, not TensorFlow's gfile (see uniimage_jax/storage): epath reads
# this variable each time it picks a backend, so setting it here, before any path is opened,
# covers Orbax and every other user of epath in the process. A user's own setting wins.
_os.environ.setdefault("EPATH_USE_TF", "false")

from uniimage_jax.platform_guard import cpu_unless_accelerator as _cpu_unless_accelerator

_cpu_unless_accelerator()
