"""The Gradio page of `uniimage-app`: three tabs over one `Engine`.

* Generate: prompt -> images (gallery, and every PNG as a download with its settings inside).
* Edit: input image + instruction -> images, with image guidance and text guidance (the official
  three guidance rows).
* Ask: a multi-turn chat with the checkpoint's MLLM about an image.

Every event goes through Gradio's queue with concurrency 1: one request at a time on the device,
later ones wait in line (the page shows their position). Handlers take the raw form values
(`preprocess=False`): the engine checks them itself and an upload is opened exactly as the CLI
opens its file, so a bad value or a corrupt upload becomes a one-line message in the page
(`gr.Error`) instead of a component error, and the server goes on answering.

The answer of Ask is computed whole by the same compiled decoding loop `uniimage-understand` runs
(one `lax.while_loop` on the device), then streamed into the chat token by token. A loop that
returned to the host after every token would be a different compiled program, whose greedy
answer could differ from the command line's in a near-tie; this way the final text is always the
CLI's.
"""

from __future__ import annotations

import os

# Before gradio is imported: no usage analytics and no version check over the network.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import gradio as gr  # noqa: E402

from uniimage_jax.app.engine import (MAX_IMAGES, MAX_NEW_TOKENS, MAX_STEPS,  # noqa: E402
                                     Engine, ImageRequest, InputError, open_upload)

SCHEDULER_CHOICES = [("DPM-Solver++", "dpm_solver"), ("Euler", "euler")]
# Download and fullscreen only: "share" would upload to Hugging Face.
IMAGE_BUTTONS = ["download", "fullscreen"]


def _upload(payload) -> tuple[str | None, str | None]:
    """(path, original name) of a raw image payload, or (None, None) when there is none."""
    if not payload:
        return None, None
    path = payload.get("path")
    return path, payload.get("orig_name") or (os.path.basename(path) if path else None)


def _progress_reporter(progress):
    return lambda fraction, message: progress(fraction, desc=message)


def _image_outputs(samples, timing, request: ImageRequest):
    gallery = [(s.path, f"seed {request.seed}, image {i}") for i, s in enumerate(samples)]
    status = (f"{timing.line()} - {len(samples)} image{'s' * (len(samples) > 1)}, "
              f"seed {request.seed}, {request.steps} steps; the PNGs hold their settings")
    return gallery, [s.path for s in samples], status


def _image_settings(prefix: str, edit: bool):
    """The shared settings row of the Generate and Edit tabs."""
    with gr.Row():
        num = gr.Number(label=f"Images (1-{MAX_IMAGES})", value=4, precision=0,
                        elem_id=f"{prefix}-num")
        seed = gr.Number(label="Seed", value=0, precision=0, elem_id=f"{prefix}-seed")
        steps = gr.Number(label=f"Steps (1-{MAX_STEPS})", value=30, precision=0,
                          elem_id=f"{prefix}-steps")
        guidance = gr.Number(label="Text guidance", value=4.5, elem_id=f"{prefix}-guidance")
        image_guidance = gr.Number(label="Image guidance", value=1.5, visible=edit,
                                   elem_id=f"{prefix}-image-guidance")
        scheduler = gr.Dropdown(SCHEDULER_CHOICES, value="dpm_solver", label="Scheduler",
                                elem_id=f"{prefix}-scheduler")
    return num, seed, steps, guidance, image_guidance, scheduler


def _results(prefix: str):
    gallery = gr.Gallery(label="Results", format="png", columns=4, height=300,
                         object_fit="contain", buttons=IMAGE_BUTTONS,
                         elem_id=f"{prefix}-gallery")
    status = gr.Markdown(elem_id=f"{prefix}-status")
    files = gr.File(label="PNG files (prompt, seed, steps, guidance, scheduler, sample index "
                          "and checkpoint in their text metadata)",
                    file_count="multiple", interactive=False, elem_id=f"{prefix}-files")
    return gallery, files, status


def _generate_tab(engine: Engine):
    prompt = gr.Textbox(label="Prompt", lines=2, elem_id="gen-prompt")
    negative = gr.Textbox(label="Negative prompt", elem_id="gen-negative")
    num, seed, steps, guidance, _, scheduler = _image_settings("gen", edit=False)
    run = gr.Button("Generate", variant="primary", elem_id="gen-run")
    gallery, files, status = _results("gen")

    def generate(prompt, negative, num, seed, steps, guidance, scheduler,
                 progress=gr.Progress()):
        try:
            request = ImageRequest.check(prompt, negative, num, seed, steps, guidance,
                                         scheduler=scheduler)
            samples, timing = engine.generate(request, progress=_progress_reporter(progress))
        except InputError as e:
            raise gr.Error(str(e), print_exception=False) from None
        return _image_outputs(samples, timing, request)

    run.click(generate, [prompt, negative, num, seed, steps, guidance, scheduler],
              [gallery, files, status], preprocess=False)


def _edit_tab(engine: Engine):
    with gr.Row():
        source = gr.Image(label="Input image (upload or paste)", type="filepath",
                          image_mode=None, sources=["upload", "clipboard"], format="png",
                          buttons=IMAGE_BUTTONS, elem_id="edit-image")
        with gr.Column():
            instruction = gr.Textbox(label="Instruction", lines=2, elem_id="edit-prompt")
            negative = gr.Textbox(label="Negative prompt", elem_id="edit-negative")
    num, seed, steps, guidance, image_guidance, scheduler = _image_settings("edit", edit=True)
    run = gr.Button("Edit", variant="primary", elem_id="edit-run")
    gallery, files, status = _results("edit")

    def edit(source, instruction, negative, num, seed, steps, guidance, image_guidance,
             scheduler, progress=gr.Progress()):
        try:
            request = ImageRequest.check(instruction, negative, num, seed, steps, guidance,
                                         image_guidance, scheduler, what="instruction")
            path, name = _upload(source)
            image = open_upload(path, name)
            samples, timing = engine.generate(request, image, image_path=path,
                                              progress=_progress_reporter(progress))
        except InputError as e:
            raise gr.Error(str(e), print_exception=False) from None
        return _image_outputs(samples, timing, request)

    run.click(edit, [source, instruction, negative, num, seed, steps, guidance, image_guidance,
                     scheduler], [gallery, files, status], preprocess=False)


def _chat_messages(history) -> list[dict[str, str]]:
    out = []
    for question, answer in history:
        out += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    return out


def _token_prefixes(tokenizer, text: str) -> list[str]:
    """`text` as it grows token by token, for streaming: the decoded prefixes of its tokens that
    are prefixes of it (one ending inside a multi-byte character decodes to a replacement
    character and is left out), the whole text excluded."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    out = []
    for k in range(1, len(ids)):
        partial = tokenizer.decode(ids[:k])
        if text.startswith(partial) and len(partial) > len(out[-1] if out else ""):
            out.append(partial)
    return [p for p in out if p != text]


def _ask_tab(engine: Engine):
    history = gr.State([])   # [(question, answer)], the conversation the MLLM sees
    with gr.Row():
        source = gr.Image(label="Image (upload or paste; optional)", type="filepath",
                          image_mode=None, sources=["upload", "clipboard"], format="png",
                          buttons=IMAGE_BUTTONS, elem_id="ask-image")
        chat = gr.Chatbot(label="Conversation", height=300, elem_id="ask-chat")
    question = gr.Textbox(label="Question", elem_id="ask-question")
    with gr.Row():
        max_new = gr.Number(label=f"Max new tokens (1-{MAX_NEW_TOKENS})", value=256,
                            precision=0, elem_id="ask-max-new")
        temperature = gr.Number(label="Temperature (0 = greedy)", value=0.0,
                                elem_id="ask-temperature")
        top_p = gr.Number(label="Top-p", value=1.0, elem_id="ask-top-p")
        seed = gr.Number(label="Seed (sampling)", value=0, precision=0, elem_id="ask-seed")
    with gr.Row():
        send = gr.Button("Ask", variant="primary", elem_id="ask-run")
        clear = gr.Button("New conversation", elem_id="ask-clear")
    status = gr.Markdown(elem_id="ask-status")

    def ask(source, question, max_new, temperature, top_p, seed, history,
            progress=gr.Progress()):
        try:
            path, name = _upload(source)
            image = open_upload(path, name) if path else None
            answer, timing = engine.ask(question, image, history, max_new_tokens=max_new,
                                        temperature=temperature, top_p=top_p, seed=seed,
                                        progress=_progress_reporter(progress))
        except InputError as e:
            raise gr.Error(str(e), print_exception=False) from None
        asked = _chat_messages(history) + [{"role": "user", "content": question}]
        for partial in _token_prefixes(engine.processor.tokenizer, answer):
            yield [*asked, {"role": "assistant", "content": partial}], history, gr.skip(), ""
        yield ([*asked, {"role": "assistant", "content": answer}],
               history + [(question, answer)], timing.line(), "")

    send.click(ask, [source, question, max_new, temperature, top_p, seed, history],
               [chat, history, status, question], preprocess=False)
    question.submit(ask, [source, question, max_new, temperature, top_p, seed, history],
                    [chat, history, status, question], preprocess=False)
    for event in (clear.click, source.change):   # a new image starts a new conversation
        event(lambda: ([], [], ""), None, [chat, history, status], queue=False)


def build_page(engine: Engine, *, title: str = "uniimage") -> gr.Blocks:
    """The page (not launched); its queue runs one request at a time."""
    with gr.Blocks(title=title, analytics_enabled=False) as page:
        gr.Markdown(f"## TBAC-UniImage (JAX): generate, edit, ask\n"
                    f"Checkpoint `{engine.checkpoint}`. The first request of each shape "
                    "compiles (once); later ones reuse the compiled programs.")
        with gr.Tab("Generate", elem_id="tab-generate"):
            _generate_tab(engine)
        with gr.Tab("Edit", elem_id="tab-edit"):
            _edit_tab(engine)
        with gr.Tab("Ask", elem_id="tab-ask"):
            _ask_tab(engine)
    page.queue(default_concurrency_limit=1, max_size=64)
    return page
