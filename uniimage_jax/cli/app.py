"""`uniimage-app`: the web app (Gradio) for a TBAC-UniImage checkpoint: generate, edit, ask.

    uniimage-app [--checkpoint DIR] [--processor DIR] [--host 127.0.0.1] [--port 7860]
        [--dtype float32|bfloat16] [--out DIR] [--share] [--check] [--debug]

--checkpoint is anything `uniimage-sample` takes (a converted TBAC-UniImage or a training stage
directory, its latest step); without it, the generation stage of `uniimage-demo`'s default
workdir (./uniimage_demo/demo). --processor defaults to the `tiny_processor` a tiny run (the demo)
wrote next to its stages. The server listens on 127.0.0.1 only unless --host says otherwise;
--share (a public Gradio link) only when asked. --check starts the server, fetches the page once
and exits (0 when it was served): a start-up test for scripts. Needs the `app` extra
(`pip install -e ".[app]"`).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import urllib.request

from uniimage_jax import storage
from uniimage_jax.cli.arguments import add_model_arguments
from uniimage_jax.cli.errors import add_debug_argument, run_command
from uniimage_jax import hub
from uniimage_jax.errors import UserError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="uniimage-app", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(
        p, checkpoint_help="converted TBAC-UniImage or training stage directory (default: the "
                           "demo's, ./uniimage_demo/demo)",
        processor_help="Qwen2.5-VL directory with the tokenizer and image processor (default: "
                       "the tiny_processor next to a tiny run's stages)", backend_dtype=True)
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default %(default)s: this machine only)")
    p.add_argument("--port", type=int, default=7860, help="default %(default)s")
    p.add_argument("--out", default=None,
                   help="folder for the generated PNGs (default: a temporary folder)")
    p.add_argument("--share", action="store_true",
                   help="also serve through a public gradio.live link (off unless asked)")
    p.add_argument("--check", action="store_true",
                   help="start, fetch the page once, stop; exit 0 if it was served")
    add_debug_argument(p)
    return p


def default_checkpoint() -> str:
    """The generation stage `uniimage-demo` writes in its default workdir, relative to here."""
    from uniimage_jax.eval import demo_experiment

    workdir = demo_experiment.DEFAULT_WORKDIR
    try:
        stage = demo_experiment.load_demo_module(demo_experiment.default_config_path()).STAGES[""]
    except FileNotFoundError:   # not a source checkout: no configs/demo.py, no demo run either
        stage = "demo"
    return os.path.join(workdir, stage)


def _check_args(args) -> None:
    """Everything checkable before loading: the checkpoint, the port."""
    if args.checkpoint is None:
        args.checkpoint = default_checkpoint()
        if not os.path.isdir(args.checkpoint):
            raise FileNotFoundError(
                f"no --checkpoint given and no demo checkpoint at {args.checkpoint}: run "
                "`uniimage-demo` here first (a few CPU minutes), or pass --checkpoint DIR")
    elif not storage.exists(args.checkpoint):
        raise FileNotFoundError(f"checkpoint {args.checkpoint!r} does not exist")
    # A Hugging Face model id is fetched (or found in the Hub cache) here, before any loading.
    args.processor = hub.resolve(args.processor, files=hub.PROCESSOR, what="--processor")
    if args.processor is not None and not storage.is_dir(args.processor):
        raise FileNotFoundError(f"processor directory {args.processor!r} does not exist")
    if not 0 < args.port < 65536:
        raise UserError(f"--port must be in 1..65535, got {args.port}")


def serve(args, *, block: bool = True):
    """Load, build the page and launch it; returns the launched `gr.Blocks` (with block=False
    the server runs in a thread until `.close()`)."""
    from uniimage_jax.app.engine import Engine

    try:
        from uniimage_jax.app.ui import build_page
    except ModuleNotFoundError as e:
        if e.name != "gradio":
            raise
        raise UserError('gradio is not installed: pip install -e ".[app]"') from None
    out = args.out or tempfile.mkdtemp(prefix="uniimage_app_")
    os.makedirs(out, exist_ok=True)
    print(f"uniimage-app: loading {args.checkpoint} ...", flush=True)
    engine = Engine.load(args.checkpoint, args.processor, out, args.dtype)
    page = build_page(engine)
    try:
        page.launch(server_name=args.host, server_port=args.port, share=args.share,
                    prevent_thread_lock=True, show_error=True, quiet=True, ssr_mode=False,
                    allowed_paths=[os.path.abspath(out)], max_file_size="64mb")
    except OSError as e:  # the port is taken, or the address is not this machine's
        raise UserError(f"cannot serve on --host {args.host} --port {args.port}: {e}") from e
    print(f"uniimage-app: serving {args.checkpoint} at {page.local_url}"
          + (f" and {page.share_url}" if args.share else "") + f"; PNGs in {out}", flush=True)
    if block:
        page.block_thread()
    return page


def _check_page(page) -> None:
    try:
        with urllib.request.urlopen(page.local_url, timeout=60) as response:
            served = response.status == 200 and b"gradio" in response.read().lower()
            status = response.status
    except OSError as e:
        raise UserError(f"--check: {page.local_url} did not answer: {e}") from e
    if not served:
        raise UserError(f"--check: {page.local_url} answered {status} without the page")
    print(f"uniimage-app: {page.local_url} served the page; --check done", flush=True)


def _main(args) -> None:
    _check_args(args)
    page = serve(args, block=not args.check)
    if args.check:
        try:
            _check_page(page)
        finally:
            page.close()


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return run_command("uniimage-app", lambda: _main(args), debug=args.debug)


if __name__ == "__main__":
    sys.exit(main())
