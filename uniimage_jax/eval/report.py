"""A self-contained HTML report of a model measured on the synthetic benchmark.

One file, readable offline in any browser, nothing fetched and no script: images are embedded as
PNG data URIs (enlarged with nearest-neighbour scaling, so a 32 px sample is shown as itself, only
bigger), the loss curves as inline SVG drawn by matplotlib, the page laid out by inline CSS. The
HTML is a Jinja2 template rendered with autoescaping, so prompts and captions a model wrote cannot
break the page.

Sections: what was run (and what it is not), the score tables (one column per evaluated model,
e.g. untrained and trained), the loss curves of each training stage (from its metrics.jsonl; a
stage that measured a held-out loss, `config.eval`, gets a second plot of it: overall, per noise
band, and from the EMA weights when it kept one),
then generation (each prompt, its samples per model, the scorer's verdict under each sample: correct
or not, what was detected, the first claim that failed) and understanding (each image, its true
caption, each model's caption and its verdict).

Inputs are the records of `synthetic_eval` (the same dicts the demo writes to its JSON file) plus
the images, so the page shows exactly what was scored. `write_results` writes the page, the
labelled sheets (`sheets.py`) and that JSON file together from one `synthetic_eval.Evaluation`.
"""
from __future__ import annotations

import base64
import io
import json
import os
from typing import Mapping, Sequence

import jinja2

from uniimage_jax.errors import UserError
from uniimage_jax.eval import sheets, synthetic_eval
from uniimage_jax.eval.sheets import enlarge

REPORT_FILE = "report.html"

_TEMPLATE = r"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<title>{{ title }}</title>
<style>
body { font-family: "DejaVu Sans", Verdana, sans-serif; margin: 24px auto; max-width: 1400px;
       color: #222; line-height: 1.4; padding: 0 16px; }
h1 { font-size: 26px; margin-bottom: 4px; } h2 { margin-top: 36px; border-bottom: 2px solid #ddd; }
nav a { margin-right: 14px; }
.about { background: #f5f5f0; border-left: 4px solid #aaa; padding: 8px 16px; }
table.scores { border-collapse: collapse; margin: 8px 24px 16px 0; display: inline-table;
               vertical-align: top; }
table.scores caption { font-weight: bold; text-align: left; padding-bottom: 4px;
                       white-space: nowrap; }
table.scores td, table.scores th { border: 1px solid #ccc; padding: 3px 10px; text-align: right; }
table.scores td:first-child, table.scores th:first-child { text-align: left; }
table.scores tr.overall { font-weight: bold; background: #f3f3f3; }
.curves svg { max-width: 100%; height: auto; }
.prompt { border-top: 1px solid #e3e3e3; padding: 10px 0; }
.prompt h3 { margin: 0 0 6px 0; font-size: 18px; }
.tag { color: #777; font-size: 13px; font-weight: normal; margin-left: 8px; }
.phase { display: flex; align-items: flex-start; gap: 10px; margin: 6px 0; }
.phase-name { width: 90px; flex: none; color: #555; font-size: 14px; padding-top: 50px; }
figure { margin: 0; width: 160px; font-size: 12px; }
figure img { display: block; image-rendering: pixelated; border: 4px solid #ccc; }
figure.correct img { border-color: #1e963c; } figure.wrong img { border-color: #c82828; }
.ok { color: #1e963c; font-weight: bold; } .bad { color: #c82828; font-weight: bold; }
.detail { color: #555; }
.scenes { display: grid; grid-template-columns: repeat(auto-fill, minmax(330px, 1fr)); gap: 14px; }
.scene { display: flex; align-items: flex-start; gap: 10px; border: 1px solid #e3e3e3;
         padding: 8px; font-size: 13px; }
.scene img { image-rendering: pixelated; flex: none; }
.scene div { min-width: 0; }
.scene p { margin: 0 0 6px 0; }
.muted { color: #777; }
</style></head>
<body>
<h1>{{ title }}</h1>
<nav><a href="#about">about</a><a href="#scores">scores</a><a href="#curves">loss curves</a>
<a href="#generation">generation</a><a href="#understanding">understanding</a></nav>

<h2 id="about">What this is</h2>
<div class="about">{% for para in about %}<p>{{ para }}</p>{% endfor %}</div>
{% if settings %}<p class="muted">{{ settings }}</p>{% endif %}

<h2 id="scores">Scores (fraction correct)</h2>
{% for table in tables %}
<table class="scores"><caption>{{ table.title }}</caption>
<tr><th>category</th>{% for name in table.columns %}<th>{{ name }}</th>{% endfor %}</tr>
{% for row in table.rows %}<tr{% if row.name == "overall" %} class="overall"{% endif %}>
<td>{{ row.name }}</td>{% for v in row["values"] %}<td>{{ v }}</td>{% endfor %}</tr>
{% endfor %}</table>
{% endfor %}

<h2 id="curves">Training loss</h2>
<div class="curves">{% if curves_svg %}{{ curves_svg | safe }}{% endif %}
{% for note in curve_notes %}<p class="muted">{{ note }}</p>{% endfor %}</div>

<h2 id="generation">Generation: {{ prompts | length }} prompts</h2>
<p class="muted">Each sample is framed green when the scorer finds the prompt's objects, colours,
counts and positions (GenEval's rules), red when not; under it, what the scorer detected and the
first claim of the prompt that failed. The same noise is used for every model.</p>
{% for p in prompts %}
<div class="prompt"><h3>{{ p.caption }}<span class="tag">{{ p.tag }}</span></h3>
{% for phase in p.phases %}<div class="phase"><div class="phase-name">{{ phase.name }}</div>
{% for s in phase.samples %}<figure class="{{ 'correct' if s.correct else 'wrong' }}">
<img src="{{ s.src }}" alt="{{ phase.name }} sample {{ loop.index }}">
<figcaption>{% if s.correct %}<span class="ok">correct</span>
{% else %}<span class="bad">wrong</span>{% endif %}
<span class="detail">detected: {{ s.detected }}</span>
{% if s.failed %}<br><span class="detail">failed: {{ s.failed }}</span>{% endif %}</figcaption>
</figure>{% endfor %}</div>{% endfor %}
</div>
{% endfor %}

<h2 id="understanding">Understanding: {{ scenes | length }} images captioned</h2>
<p class="muted">The MLLM is asked to describe each held-out image; a caption is correct when all
its claims hold for the drawn scene and it names every object.</p>
<div class="scenes">
{% for s in scenes %}<div class="scene"><img src="{{ s.src }}" alt="image {{ loop.index }}">
<div><p><b>truth:</b> {{ s.truth }} <span class="tag">{{ s.tag }}</span></p>
{% for c in s.captions %}<p class="said"><b>{{ c.name }}:</b> {{ c.text or "(empty)" }}<br>
{% if c.correct %}<span class="ok">correct</span>{% else %}<span class="bad">wrong</span>
<span class="detail">failed: {{ c.failed }}</span>{% endif %}</p>{% endfor %}
</div></div>
{% endfor %}</div>
</body></html>
"""


def data_uri(image) -> str:
    """A PNG data URI of `image` enlarged (nearest-neighbour) to at least 128 px a side."""
    buf = io.BytesIO()
    enlarge(image).save(buf, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


HELD_OUT_PREFIX = "eval/"  # the held-out loss records' keys (train/eval_loss.py)


def _records(metrics_path: str):
    """(line number, record) of a trainer's metrics.jsonl: training records (with "loss") and
    held-out loss records (with "eval/..." keys); anything else is an error naming the line."""
    from uniimage_jax.data.jsonl import read_json_objects

    for n, _, record in read_json_objects(metrics_path):
        held_out = any(str(k).startswith(HELD_OUT_PREFIX) for k in record)
        if "step" not in record or not ("loss" in record or held_out):
            raise UserError(f"{metrics_path}:{n} has no \"step\" and \"loss\"")
        yield n, record


def read_loss_curve(metrics_path: str) -> tuple[list[int], list[float]]:
    """(steps, losses) of a trainer's metrics.jsonl (one JSON object per logged step)."""
    steps, losses = [], []
    for _, record in _records(metrics_path):
        if "loss" in record:
            steps.append(int(record["step"]))
            losses.append(float(record["loss"]))
    return steps, losses


def read_held_out_curves(metrics_path: str) -> dict[str, tuple[list[int], list[float]]]:
    """{"eval/loss", "eval/loss_t0.0-0.2", ..., "eval/ema_loss"...: (steps, values)} of the
    held-out loss records of a metrics.jsonl (empty when the stage measured none)."""
    curves: dict[str, tuple[list[int], list[float]]] = {}
    for _, record in _records(metrics_path):
        for key, value in record.items():
            if str(key).startswith(HELD_OUT_PREFIX):
                steps, values = curves.setdefault(key, ([], []))
                steps.append(int(record["step"]))
                values.append(float(value))
    return curves


def _held_out_lines(ax, curves: Mapping[str, tuple[Sequence[int], Sequence[float]]]) -> None:
    """The overall held-out loss (thick), the EMA's (dashed) and each noise band (thin, the
    raw weights')."""
    for key, (steps, values) in curves.items():
        name = key[len(HELD_OUT_PREFIX):]
        overall = name in ("loss", "ema_loss")
        if name.startswith("ema") and not overall:
            continue  # the EMA's bands would double the lines
        ax.plot(steps, values, linewidth=1.8 if overall else 0.9,
                linestyle="--" if name.startswith("ema") else "-", marker="o", markersize=2.5,
                label=name.replace("_loss", " loss").replace("loss_t", "t "))
    ax.legend(fontsize=7, ncol=2)


def loss_curves_svg(curves: Mapping[str, tuple[Sequence[int], Sequence[float]]]) -> str:
    """One inline <svg> with a loss-vs-step plot per stage (title -> (steps, losses), or ->
    {held-out key: (steps, values)} for a held-out loss plot), drawn by matplotlib (its object
    API: no pyplot, no global backend state), text kept as SVG text."""
    import matplotlib
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.2 * len(curves), 3.4))
    axes = fig.subplots(1, len(curves), squeeze=False)[0]
    for ax, (title, curve) in zip(axes, curves.items()):
        if isinstance(curve, Mapping):
            _held_out_lines(ax, curve)
        else:
            ax.plot(*curve, color="#1f5fa8", linewidth=1.4)
        ax.set_title(title, fontsize=11)
        ax.set_xlabel("step")
        ax.set_ylabel("held-out loss" if isinstance(curve, Mapping) else "training loss")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.StringIO()
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": "uniimage"}):
        fig.savefig(buf, format="svg")
    svg = buf.getvalue()
    return svg[svg.index("<svg"):]  # inline: drop the XML declaration and DOCTYPE


def _curves(stages: Mapping[str, str]):
    """(svg or "", notes) for {stage title: stage directory}."""
    curves, notes = {}, []
    for title, stage_dir in stages.items():
        path = os.path.join(stage_dir, "metrics.jsonl")
        if not os.path.isfile(path):
            notes.append(f"{title}: no metrics.jsonl in {stage_dir}")
            continue
        steps, losses = read_loss_curve(path)
        if steps:
            curves[title] = (steps, losses)
        else:
            notes.append(f"{title}: {path} holds no logged step")
        held_out = read_held_out_curves(path)
        if held_out:
            curves[f"{title}: held-out loss"] = held_out
    return (loss_curves_svg(curves) if curves else ""), notes


def _tables(scores: Mapping[str, Mapping[str, Mapping[str, float]]]) -> list[dict]:
    """{half title: {model name: {category: accuracy}}} -> template tables, `overall` last."""
    tables = []
    for title, by_model in scores.items():
        names = list(by_model)
        cats = [c for c in by_model[names[-1]] if c != "overall"] + ["overall"]
        rows = [{"name": c, "values": [f"{by_model[n][c]:.3f}" if c in by_model[n] else "-"
                                       for n in names]} for c in cats]
        tables.append({"title": title, "columns": names, "rows": rows})
    return tables


def _prompt_views(records: Sequence[Mapping], images: Mapping[str, Sequence[Sequence]]):
    views = []
    for i, record in enumerate(records):
        phases = [{"name": name, "samples": [
            {"src": data_uri(im), **verdict}
            for im, verdict in zip(rows[i], record[f"{name}_verdicts"])]}
            for name, rows in images.items()]
        views.append({"caption": record["caption"], "tag": record["metadata"].get("tag", ""),
                      "phases": phases})
    return views


def _scene_views(records: Sequence[Mapping], scene_images: Sequence, names: Sequence[str]):
    return [{"src": data_uri(image), "truth": r["truth"], "tag": r.get("tag", ""),
             "captions": [{"name": n, "text": r[n], **r[f"{n}_verdict"]} for n in names]}
            for r, image in zip(records, scene_images)]


def render_report(*, title: str, about: Sequence[str], settings: str,
                  scores: Mapping[str, Mapping[str, Mapping[str, float]]],
                  prompts: Sequence[Mapping], sample_images: Mapping[str, Sequence[Sequence]],
                  captions: Sequence[Mapping], scene_images: Sequence,
                  stages: Mapping[str, str]) -> str:
    """The report's HTML.

    Args:
      title, about (paragraphs), settings (one line: steps, seeds, sampler...).
      scores: {"understanding ...": {model name: {category: accuracy}}, "generation ...": ...}.
      prompts: `synthetic_eval.prompt_records`; sample_images: {model name: per prompt, its
        samples}, the names matching the records' "<name>_verdicts".
      captions: `synthetic_eval.caption_records`; scene_images: the captioned images (uint8 or
        PIL), in the same order.
      stages: {plot title: training stage directory holding metrics.jsonl}.
    """
    curves_svg, curve_notes = _curves(stages)
    names = [n for n in sample_images]
    return jinja2.Environment(autoescape=True).from_string(_TEMPLATE).render(
        title=title, about=about, settings=settings, tables=_tables(scores),
        curves_svg=curves_svg, curve_notes=curve_notes,
        prompts=_prompt_views(prompts, sample_images),
        scenes=_scene_views(captions, scene_images, names))


def write_report(path: str, html: str) -> str:
    """Writes the page (UTF-8) and returns its absolute path."""
    path = os.path.abspath(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(html)
    return path


def write_results(evaluation: synthetic_eval.Evaluation, out_dir: str, *, scores_file: str,
                  sheet_prefix: str, title: str, about: Sequence[str], settings: str,
                  stages: Mapping[str, str], extra: Mapping) -> dict:
    """The JSON summary (`scores_file`), the labelled sheets and report.html in `out_dir`;
    returns the summary: `extra`, both score tables, every caption, prompt and verdict, and the
    paths written ("sheets", "report", "scores_file")."""
    summary = {**extra, **evaluation.tables(),
               "captions": synthetic_eval.caption_records(evaluation.scenes,
                                                          evaluation.understanding),
               "prompts": synthetic_eval.prompt_records(evaluation.prompts,
                                                        evaluation.generation)}
    images = {n: r.images for n, r in evaluation.generation.items()}
    rows = [{"prompt": record["caption"], "tag": record["metadata"].get("tag", ""),
             **{n: list(zip(images[n][i], record[f"{n}_correct"])) for n in images}}
            for i, record in enumerate(summary["prompts"])]
    os.makedirs(out_dir, exist_ok=True)
    summary["sheets"] = sheets.save_sheets(rows, list(images), out_dir, sheet_prefix, title)
    html = render_report(
        title=title, about=about, settings=settings,
        scores={f"understanding: {len(evaluation.scenes)} images captioned":
                summary["understanding"],
                f"generation: {len(evaluation.prompts)} prompts x "
                f"{evaluation.num_images()} samples": summary["generation"]},
        prompts=summary["prompts"], sample_images=images, captions=summary["captions"],
        scene_images=[s["image"] for s in evaluation.scenes], stages=stages)
    summary["report"] = write_report(os.path.join(out_dir, REPORT_FILE), html)
    summary["scores_file"] = os.path.join(os.path.abspath(out_dir), scores_file)
    with open(summary["scores_file"], "w") as f:
        json.dump(summary, f, indent=2)
    return summary
