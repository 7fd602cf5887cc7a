"""What the web app does, without the web: checked requests, the library's own sampler and
answerer, PNGs that carry their settings, and honest timing.

Same results as the command line by construction: `Engine.generate` calls the sampler
`uniimage-sample` calls (`sample_latents`, then `latents_to_uint8` in the same fixed-size decode
chunks) with a `SamplingConfig` built from the same fields and the CLI's defaults, so image i of
a prompt comes from the same noise (`fold_in(PRNGKey(seed), i)`), the same group of
`images_per_call` samples and the same compiled programs: bitwise the CLI's PNG. The stored
command names the compute dtype, whose default depends on the machine (bf16 on accelerators). `Engine.ask` calls `answer`, as
`uniimage-understand` does, on the MLLM inside the checkpoint.

Timing: JAX reports the time it spends tracing, lowering and compiling (or fetching a compiled
program from the persistent cache) through `jax.monitoring`; `CompileClock` adds those up, so a
request's timing line says how much of it was compiling. Compiled programs are cached by JAX per
shape, so a second request of the same shape skips all of it. `Engine.will_compile` predicts
whether a request brings a new shape (prompt length bucket, image grid, steps, scheduler,
guidance rows), for the "compiling, first request only" notice shown before the work starts.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shlex
import shutil
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from PIL import Image, PngImagePlugin

from uniimage_jax.errors import UserError

MAX_IMAGES = 16                    # per request
MAX_STEPS = 200
MAX_UPLOAD_PIXELS = 4096 * 4096    # larger uploads are refused before they are decoded
MAX_NEW_TOKENS = 1024
MAX_SEED = 2**31 - 1
SCHEDULERS = ("dpm_solver", "euler")
PNG_SETTINGS_KEY = "uniimage"      # the PNG text chunk holding a sample's settings as JSON

Progress = Callable[[float, str], None]


class InputError(UserError):
    """A request the user has to change; the message names the field and is shown as is."""


def _integer(name: str, value, low: int, high: int) -> int:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise InputError(f"{name} must be a whole number, got {value!r}") from None
    if not math.isfinite(number) or number != int(number):
        raise InputError(f"{name} must be a whole number, got {value!r}")
    if not low <= number <= high:
        raise InputError(f"{name} must be between {low} and {high}, got {int(number)}")
    return int(number)


def _real(name: str, value, low: float, high: float) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise InputError(f"{name} must be a number, got {value!r}") from None
    if not (math.isfinite(number) and low <= number <= high):
        raise InputError(f"{name} must be between {low:g} and {high:g}, got {value!r}")
    return number


@dataclasses.dataclass(frozen=True)
class ImageRequest:
    """One text-to-image or edit request, checked (`ImageRequest.check`)."""
    prompt: str
    negative_prompt: str = ""
    num_images: int = 1
    seed: int = 0
    steps: int = 30
    guidance: float = 4.5
    image_guidance: float = 1.5
    scheduler: str = "dpm_solver"

    @classmethod
    def check(cls, prompt, negative_prompt="", num_images=1, seed=0, steps=30, guidance=4.5,
              image_guidance=1.5, scheduler="dpm_solver", *, what: str = "prompt"):
        """From raw form values; an `InputError` names the first bad field."""
        if not isinstance(prompt, str) or not prompt.strip():
            raise InputError(f"the {what} is empty: type what to draw")
        if scheduler not in SCHEDULERS:
            raise InputError(f"unknown scheduler {scheduler!r}: expected one of {SCHEDULERS}")
        return cls(prompt=prompt, negative_prompt=negative_prompt or "",
                   num_images=_integer("number of images", num_images, 1, MAX_IMAGES),
                   seed=_integer("seed", seed, 0, MAX_SEED),
                   steps=_integer("steps", steps, 1, MAX_STEPS),
                   guidance=_real("guidance", guidance, 0.0, 100.0),
                   image_guidance=_real("image guidance", image_guidance, 0.0, 100.0),
                   scheduler=scheduler)

    def sampling_config(self):
        """The CLI's `SamplingConfig` for these settings (its other fields at the CLI defaults)."""
        from uniimage_jax.sampling.sampler import SamplingConfig

        return SamplingConfig(num_steps=self.steps, guidance_scale=self.guidance,
                              image_guidance_scale=self.image_guidance, scheduler=self.scheduler,
                              negative_prompt=self.negative_prompt)


def open_upload(path: str | None, name: str | None = None) -> Image.Image:
    """An uploaded image as RGB, read as `uniimage-sample --image` reads its file; a corrupt file
    or one over `MAX_UPLOAD_PIXELS` is refused before its pixels are decoded."""
    name = name or (os.path.basename(path) if path else "the upload")
    if not path or not os.path.isfile(path):
        raise InputError("no input image: upload or paste one first")
    try:
        with Image.open(path) as probe:
            width, height = probe.size
    except (OSError, ValueError, Image.DecompressionBombError):
        raise InputError(f"{name} is not an image this app can read (PNG, JPEG, WebP, ...)") \
            from None
    if width * height > MAX_UPLOAD_PIXELS:
        raise InputError(f"{name} is {width} x {height} pixels, over the limit of "
                         f"{MAX_UPLOAD_PIXELS:,} pixels: downscale it first")
    try:
        return Image.open(path).convert("RGB")
    except (OSError, ValueError):
        raise InputError(f"{name} is damaged: its pixels cannot be decoded") from None


class CompileClock:
    """Seconds JAX has spent tracing, lowering and compiling (or loading compiled programs from
    its persistent cache) in this process, from its `jax.monitoring` duration events."""

    EVENTS = ("/jax/core/compile/jaxpr_trace_duration",
              "/jax/core/compile/jaxpr_to_mlir_module_duration",
              "/jax/core/compile/backend_compile_duration")
    _lock = threading.Lock()
    _seconds = 0.0
    _registered = False

    @classmethod
    def _listen(cls, event: str, duration: float, **_) -> None:
        if event in cls.EVENTS:
            with cls._lock:
                cls._seconds += duration

    @classmethod
    def seconds(cls) -> float:
        with cls._lock:
            if not cls._registered:   # listeners cannot be removed: register once per process
                import jax

                jax.monitoring.register_event_duration_secs_listener(cls._listen)
                cls._registered = True
            return cls._seconds


@dataclasses.dataclass(frozen=True)
class Timing:
    request: int            # requests served by this engine so far, this one included
    seconds: float
    compile_seconds: float

    def line(self) -> str:
        return (f"request {self.request}: took {self.seconds:.1f} s "
                f"(compile {self.compile_seconds:.1f} s)")


class _Stopwatch:
    def __init__(self, engine: Engine):
        self._engine = engine

    def __enter__(self):
        self._compile0 = CompileClock.seconds()
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, exc_type, *_):
        if exc_type is None:
            self._engine.served += 1
            self.timing = Timing(self._engine.served, time.perf_counter() - self._t0,
                                 CompileClock.seconds() - self._compile0)


@dataclasses.dataclass
class Sample:
    """One generated image, the PNG written for it and the settings stored in that PNG."""
    image: Image.Image
    path: str
    settings: dict[str, Any]


def png_settings(path: str) -> dict[str, Any]:
    """The settings a PNG written by the app carries (its `uniimage` text chunk)."""
    with Image.open(path) as im:
        return json.loads(im.text[PNG_SETTINGS_KEY])


def _absolute(path: str) -> str:
    """An absolute local path (so a stored command runs from anywhere); URLs (gs://) as given."""
    return path if "://" in path else os.path.abspath(path)


class Engine:
    """A loaded checkpoint serving image and answer requests, one at a time (the web page queues
    them), writing PNGs under `out_dir`."""

    def __init__(self, model, params, processor, *, checkpoint: str, out_dir: str,
                 processor_dir: str | None = None, dtype: str = "float32"):
        self.model, self.params, self.processor = model, params, processor
        self.checkpoint = _absolute(checkpoint)
        self.processor_dir = _absolute(processor_dir) if processor_dir else None
        self.dtype = dtype
        self.out_dir = out_dir
        self._seen_shapes: set = set()
        self.served = 0   # requests answered (the page numbers its timing lines with it)

    @classmethod
    def load(cls, checkpoint: str, processor_dir: str | None, out_dir: str,
             dtype: str | None = None) -> Engine:
        """Any checkpoint `uniimage-sample` takes (converted TBAC-UniImage or a training stage
        directory); without `processor_dir`, the `tiny_processor` next to a tiny run's stages.
        `dtype`: the compute dtype, by default `uniimage-sample`'s (bf16 on accelerators)."""
        from uniimage_jax.checkpoints.loader import load_for_inference
        from uniimage_jax.models.layers import compute_dtype
        from uniimage_jax.sampling.sampler import default_compute_dtype

        dtype = dtype or default_compute_dtype()

        model, params, processor = load_for_inference(
            checkpoint, processor_dir, dtype=compute_dtype(dtype, "dtype"))
        return cls(model, params, processor, checkpoint=checkpoint, out_dir=out_dir,
                   processor_dir=processor_dir, dtype=dtype)

    # ------------------------------------------------------------------------ shapes
    def _image_shape_key(self, request: ImageRequest, image) -> tuple:
        """What the compiled sampling programs depend on: the guidance rows' padded prompt
        length and image grid (encoded as the sampler encodes them), steps and scheduler."""
        from uniimage_jax.processing.prompts import TruncationLog, build_generation_inputs
        from uniimage_jax.sampling.sampler import guidance_rows

        cfg = request.sampling_config()
        c = self.model.config
        captions, images, k = guidance_rows(request.prompt, image, cfg)
        enc = build_generation_inputs(self.processor, captions, images,
                                      num_metaqueries=c.num_metaqueries,
                                      system_prompt=c.system_prompt,
                                      max_caption_tokens=c.max_caption_tokens,
                                      # the sampler names a cut prompt when it encodes it
                                      truncations=TruncationLog(quiet=True))
        return ("image", k, cfg.prompt_length(enc["input_ids"].shape[1]),
                enc.get("image_grid_thw"), request.steps, request.scheduler)

    def _answer_shape_key(self, question: str, image, history, max_new_tokens: int,
                          temperature: float) -> tuple:
        from uniimage_jax.processing.qwen import encode_chat

        enc = encode_chat(self.processor, [question], [[image] if image else None],
                          histories=[history])
        return ("answer", enc["input_ids"].shape[1], enc.get("image_grid_thw"), max_new_tokens,
                temperature > 0)

    def will_compile(self, key: tuple) -> bool:
        """Whether a request of this shape key is the first of its shape in this process."""
        return key not in self._seen_shapes

    # ------------------------------------------------------------------------ images
    def generate(self, request: ImageRequest, image: Image.Image | None = None,
                 image_path: str | None = None,
                 progress: Progress | None = None) -> tuple[list[Sample], Timing]:
        """The request's images (an edit when `image` is given: image + text guidance) as
        `Sample`s with their PNGs written; the same pixels as `uniimage-sample`."""
        from uniimage_jax.sampling.sampler import latents_to_uint8, sample_latents

        progress = progress or (lambda fraction, message: None)
        key = self._image_shape_key(request, image)
        n = request.num_images
        with _Stopwatch(self) as watch:
            progress(0.0, ("compiling, first request only: " if self.will_compile(key) else "")
                     + f"denoising {n} image{'s' * (n > 1)}, {request.steps} steps")
            cfg = request.sampling_config()
            latents = sample_latents(self.model, self.params, self.processor, request.prompt,
                                     image, num_images=n, seed=request.seed, cfg=cfg)
            latents.block_until_ready()
            progress(0.8, f"decoding {n} image{'s' * (n > 1)}")
            pixels = latents_to_uint8(self.model, self.params, latents, batch=cfg.decode_batch)
        self._seen_shapes.add(key)
        samples = self._write(request, [Image.fromarray(p) for p in pixels], image_path)
        return samples, watch.timing

    def _write(self, request: ImageRequest, images: Sequence[Image.Image],
               image_path: str | None) -> list[Sample]:
        folder = os.path.join(self.out_dir, f"request_{self.served:04d}")
        os.makedirs(folder, exist_ok=True)
        edit_input = None
        if image_path is not None:   # kept beside the outputs: the command below re-runs it
            edit_input = os.path.join(folder, "input" + os.path.splitext(image_path)[1])
            shutil.copyfile(image_path, edit_input)
        samples = []
        for i, im in enumerate(images):
            settings = self.settings(request, i, edit_input)
            info = PngImagePlugin.PngInfo()
            info.add_text(PNG_SETTINGS_KEY, json.dumps(settings))
            info.add_text("Software", "uniimage_jax uniimage-app")
            path = os.path.join(folder, f"seed{request.seed}_{i:02d}.png")
            im.save(path, pnginfo=info)
            samples.append(Sample(im, path, settings))
        return samples

    def settings(self, request: ImageRequest, index: int, edit_input: str | None) -> dict:
        """Everything that determines sample `index`, and the `uniimage-sample` command that
        writes the same pixels (to OUT/00000_<index>.png)."""
        argv = ["uniimage-sample", "--checkpoint", self.checkpoint]
        if self.processor_dir:
            argv += ["--processor", self.processor_dir]
        argv += ["--prompt", request.prompt, "--negative-prompt", request.negative_prompt,
                 "--seed", str(request.seed), "--steps", str(request.steps),
                 "--guidance", repr(request.guidance), "--scheduler", request.scheduler,
                 "--num-images", str(index + 1)]
        if edit_input:
            argv += ["--image", edit_input, "--image-guidance", repr(request.image_guidance)]
        argv += ["--dtype", self.dtype, "--out", "OUT"]
        out = {"prompt": request.prompt, "negative_prompt": request.negative_prompt,
               "seed": request.seed, "sample_index": index, "steps": request.steps,
               "guidance": request.guidance, "scheduler": request.scheduler,
               "checkpoint": self.checkpoint, "processor": self.processor_dir,
               "dtype": self.dtype, "images_per_call": request.sampling_config().images_per_call}
        if edit_input:
            with open(edit_input, "rb") as fh:
                digest = hashlib.sha256(fh.read()).hexdigest()
            out.update(image_guidance=request.image_guidance, input_image=edit_input,
                       input_image_sha256=digest)
        out["command"] = shlex.join(argv)
        return out

    # ------------------------------------------------------------------------ answers
    def ask(self, question: str, image: Image.Image | None = None,
            history: Sequence[tuple[str, str]] = (), *, max_new_tokens: int = 256,
            temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
            progress: Progress | None = None) -> tuple[str, Timing]:
        """The MLLM's answer, as `uniimage-understand` gives it for the same question, image and
        decoding settings (greedy at temperature 0); `history` holds the earlier turns."""
        import jax

        from uniimage_jax.sampling.text_generation import answer

        if not isinstance(question, str) or not question.strip():
            raise InputError("the question is empty: type what to ask")
        max_new_tokens = _integer("max new tokens", max_new_tokens, 1, MAX_NEW_TOKENS)
        temperature = _real("temperature", temperature, 0.0, 10.0)
        top_p = _real("top-p", top_p, 1e-6, 1.0)
        seed = _integer("seed", seed, 0, MAX_SEED)
        history = [tuple(turn) for turn in history]
        key = self._answer_shape_key(question, image, history, max_new_tokens, temperature)
        with _Stopwatch(self) as watch:
            if progress:
                progress(0.0, ("compiling, first request only: " if self.will_compile(key)
                               else "") + "answering")
            text = answer(self.model.mllm, self.params["mllm"], self.processor,
                          [[image] if image else None], [question],
                          max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                          rng=jax.random.PRNGKey(seed), histories=[history])[0]
        self._seen_shapes.add(key)
        return text, watch.timing
