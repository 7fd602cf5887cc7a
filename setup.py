"""uniimage_jax: TBAC-UniImage (Qwen2.5-VL + ladder SANA + DC-AE) in JAX/Flax."""
from setuptools import find_packages, setup

setup(
    name="uniimage_jax",
    version="0.1.0",
    description="JAX/Flax reimplementation of TBAC-UniImage: a frozen Qwen2.5-VL whose "
    "multi-layer hidden states condition a SANA diffusion transformer.",
    packages=find_packages(include=["uniimage_jax", "uniimage_jax.*"]),
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.10",
        "flax>=0.12",
        "optax>=0.2.6",
        "orbax-checkpoint>=0.11",
        "ml-collections>=1.0",
        "grain>=0.2.12",
        "transformers>=5.0,<6",
        "tokenizers>=0.22",
        "safetensors>=0.5",
        "numpy>=1.26",
        "pillow>=10.1",          # ImageFont.load_default(size=...): the sheets' fallback font
        "tqdm>=4.60",
        "msgpack>=1.0",          # latent cache records (no pickle)
        "array-record>=0.5",     # latent cache shards (grain reads ArrayRecord)
        "jinja2>=3.1",           # transformers chat templates; the demo report page
        "tensorboardX>=2.6",
        "absl-py>=1.0",
        "matplotlib>=3.7",       # the demo report's loss curves; its DejaVu font labels sheets
        "gcsfs>=2024.2",         # gs:// paths (through etils.epath / fsspec; uniimage_jax/storage)
        "braceexpand>=0.1.7",    # WebDataset shard patterns, shards/{00000..01023}.tar
    ],
    extras_require={
        # The PyTorch reference for parity tests. Install torch first from the
        # CPU index / wheel (see .ci/run): a bare `torch` here would otherwise
        # pull several GB of CUDA packages on a machine without torch.
        "test": [
            "torch>=2.4",
            "transformers>=5.0,<6",
            "diffusers>=0.35",
            "pytest>=8",
            "pytest-xdist>=3",
            "filelock>=3",          # artefacts made once per session for all xdist workers
            "peft>=0.17",           # LoRA interoperability tests
            "playwright>=1.50",     # real-browser tests, driving Debian's chromium
            "gcp-storage-emulator>=2024.8",  # the local Cloud Storage the gs:// tests use
            # The published layouts' own writers make the data sources' test sets.
            "webdataset>=1.0",
            "datasets>=3.0",
        ],
        # data.source='hf': Hugging Face Arrow / parquet tables (read with `datasets`).
        "hf": ["datasets>=3.0"],
        # A local Cloud Storage emulator for rehearsing pod runs (uniimage_jax/storage/emulator.py).
        "emulator": ["gcp-storage-emulator>=2024.8"],
        # TFDS sources / the user-data builder (TensorFlow is only imported by them).
        "tfds": ["tensorflow-cpu==2.21.0", "tensorflow-datasets==4.9.10",
                 "importlib_resources>=6"],
        # The web app.
        "app": ["gradio>=5"],
        "gpu": ["jax[cuda12]>=0.10"],
        "tpu": ["jax[tpu]>=0.10"],
        # Ahead-of-time compiles for TPU topologies on any host (`uniimage-bench --aot`): libtpu
        # must be the one built for the installed jax/jaxlib, which jax[tpu] pins exactly, so the
        # trio is pinned together here (bump all three at once).
        "aot": ["jax[tpu]==0.10.2", "jaxlib==0.10.2", "libtpu==0.0.42.1"],
    },
    entry_points={
        "console_scripts": [
            "uniimage-convert=uniimage_jax.cli.convert:main",
            "uniimage-train=uniimage_jax.cli.train:main",
            "uniimage-cache-latents=uniimage_jax.cli.cache_latents:main",
            "uniimage-understand=uniimage_jax.cli.understand:main",
            "uniimage-sample=uniimage_jax.cli.sample:main",
            "uniimage-bench=uniimage_jax.cli.bench:main",
            "uniimage-demo=uniimage_jax.cli.demo:main",
            "uniimage-app=uniimage_jax.cli.app:main",
            "uniimage-rehearse=uniimage_jax.cli.rehearse:main",
        ],
    },
)
