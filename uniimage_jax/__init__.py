"""uniimage_jax: TBAC-UniImage in JAX/Flax.

Subpackages: models (Qwen2.5-VL, SANA, DC-AE, the unified model), convert (strict PyTorch ->
Flax conversion), processing (prompts, tokenizer, image preprocessing), data, train, sampling,
eval.
"""

__version__ = "0.1.0"

from uniimage_jax.platform_guard import cpu_unless_accelerator as _cpu_unless_accelerator

_cpu_unless_accelerator()
