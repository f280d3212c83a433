"""The report: ``report.json`` (every figure), ``report.md`` and PNG plots (matplotlib, Agg)."""
from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import numpy as np

from . import corruptions as C
from . import metrics as M

KIND_COLOURS = {"positive": "tab:green", "swapped": "tab:orange", "attribute": "tab:purple"}
DPI = 72


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"font.size": 9, "axes.titlesize": 10, "figure.titlesize": 12, "axes.grid": True,
                         "grid.alpha": 0.3})
    return plt


def _save(fig, path: Path) -> None:
    """PNG with a 64-colour palette: a quarter of the bytes, the same plot (flat colours, anti-aliased text)."""
    import io

    from PIL import Image

    buffer = io.BytesIO()
    fig.savefig(buffer, dpi=DPI, format="png")
    buffer.seek(0)
    with Image.open(buffer) as image:
        image.convert("RGB").quantize(colors=64, method=Image.Quantize.MEDIANCUT,
                                      dither=Image.Dither.NONE).save(path, format="PNG", optimize=True)


def _grid(n: int, cols: int = 4) -> tuple[int, int]:
    return math.ceil(n / cols), min(n, cols)


def _mib(x: float | None) -> str:
    return "-" if x is None else f"{x / 2**20:.1f}"


def _kib(x: float | None) -> str:
    return "-" if x is None else f"{x / 1024:.0f}"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _num(x: float | None, digits: int = 1) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


# -- plots -------------------------------------------------------------------------------------------------------
def plot_robustness(rob: dict, path: Path) -> None:
    plt = _plt()
    names = list(rob["corruptions"])
    rows, cols = _grid(len(names))
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 2.9 * rows), sharey=True, squeeze=False)
    strategies = list(rob["strategies"])
    colours = {s: f"C{i}" for i, s in enumerate(strategies)}
    for ax, name in zip(axes.flat, names):
        for s in strategies:
            curve = rob["strategies"][s]["curves"][name]
            style = "--" if s == rob["baseline"] else "-"
            label = f"{s} (late-fusion baseline)" if s == rob["baseline"] else s
            ax.plot(curve["levels"], curve["balanced"], style, marker="o", ms=3, color=colours[s], label=label)
            flagged = [(p, a) for p, a in zip(curve["levels"], curve["balanced"])
                       if p in curve.get("flagged_levels", [])]
            if flagged:
                ax.plot(*zip(*flagged), "x", color="red", ms=8, mew=2)
        single = rob["strategies"][strategies[0]]["curves"][name].get("single_modality") if strategies else None
        if single:
            ax.plot(rob["levels"], single, ":", color="grey", label="best single-modality model")
        ax.axhline(rob["chance"], color="black", lw=0.8, alpha=0.5)
        ax.set_title(rob["corruptions"][name]["label"] + f" ({rob['corruptions'][name]['modality']})")
        ax.set_ylim(0.0, 1.02)
        ax.set_xlabel("imperfection level p")
    for ax in axes[:, 0]:
        ax.set_ylabel("balanced accuracy")
    for ax in axes.flat[len(names):]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    handles.append(plt.Line2D([], [], color="red", marker="x", ls="", mew=2))
    labels.append("catastrophic (below single-modality)")
    fig.legend(handles, labels, loc="lower center", ncol=min(5, len(labels)), frameon=False)
    if rob.get("mode") == "data":
        fig.suptitle(f"Balanced accuracy (mean per-class recall) on {rob['dataset']['path']} under each imperfection "
                     f"(chance {rob['chance']:.3g})")
    else:
        fig.suptitle("Balanced accuracy of the match SCORE under each imperfection (chance 0.5)")
    fig.tight_layout(rect=(0, 0.06, 1, 0.97))
    _save(fig, path)
    plt.close(fig)


def plot_kinds(rob: dict, strategy: str, path: Path) -> None:
    plt = _plt()
    names = list(rob["corruptions"])
    rows, cols = _grid(len(names))
    fig, axes = plt.subplots(rows, cols, figsize=(3.1 * cols, 2.5 * rows), sharey=True, squeeze=False)
    for ax, name in zip(axes.flat, names):
        curve = rob["strategies"][strategy]["curves"][name]
        groups = curve["by_class"] if "by_class" in curve else curve["by_kind"]
        for kind, values in groups.items():
            values = [np.nan if v is None else v for v in values]
            ax.plot(curve["levels"], values, marker="o", ms=3, color=KIND_COLOURS.get(kind), label=kind)
        ax.plot(curve["levels"], curve["balanced"], "k--", lw=1.2, label="balanced")
        ax.set_title(rob["corruptions"][name]["label"])
        ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel("imperfection level p")
    for ax in axes[:, 0]:
        ax.set_ylabel("accuracy")
    for ax in axes.flat[len(names):]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 6), frameon=False)
    if rob.get("mode") == "data":
        fig.suptitle(f"{strategy}: recall per class")
    else:
        fig.suptitle(f"{strategy}: accuracy per kind (positives, relation-swapped and attribute negatives)")
    fig.tight_layout(rect=(0, 0.05 + 0.03 * (len(labels) // 7), 1, 0.97))
    _save(fig, path)
    plt.close(fig)


def plot_effective(rob: dict, path: Path) -> None:
    plt = _plt()
    names = list(rob["corruptions"])
    rows, cols = _grid(len(names))
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 2.6 * rows), sharey=True, squeeze=False)
    strategies = [s for s in rob["strategies"] if s != rob["baseline"]]
    for ax, name in zip(axes.flat, names):
        for i, s in enumerate(strategies):
            curve = rob["strategies"][s]["curves"][name]
            if "effective_robustness" in curve:
                ax.plot(curve["levels"], curve["effective_robustness"], marker="o", ms=3, color=f"C{i}", label=s)
        ax.axhline(0, color="black", lw=0.8)
        ax.set_title(rob["corruptions"][name]["label"])
        ax.set_xlabel("imperfection level p")
    for ax in axes[:, 0]:
        ax.set_ylabel("acc - shifted late")
    for ax in axes.flat[len(names):]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="lower center", ncol=max(1, len(labels)), frameon=False)
    fig.suptitle(f"Effective robustness: accuracy minus the late-fusion curve ({rob['baseline']}) "
                 "shifted to the same clean accuracy")
    fig.tight_layout(rect=(0, 0.05, 1, 0.96))
    _save(fig, path)
    plt.close(fig)


def plot_auc(rob: dict, path: Path) -> None:
    plt = _plt()
    names = list(rob["corruptions"])
    strategies = list(rob["strategies"])
    values = np.array([[rob["strategies"][s]["curves"][n]["relative_robustness"] for n in names] for s in strategies])
    fig, ax = plt.subplots(figsize=(max(6.5, 1.0 + 0.85 * len(names)), max(3.2, 1.6 + 0.45 * len(strategies))))
    image = ax.imshow(values, vmin=0.3, vmax=1.0, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(names)), [rob["corruptions"][n]["label"] for n in names], rotation=35, ha="right")
    ax.set_yticks(range(len(strategies)), strategies)
    ax.grid(False)
    for i in range(len(strategies)):
        for j in range(len(names)):
            ax.text(j, i, f"{values[i, j]:.2f}", ha="center", va="center",
                    color="white" if values[i, j] < 0.7 else "black", fontsize=8)
    fig.colorbar(image, ax=ax, label="area under the curve")
    ax.set_title("Relative robustness: area under the balanced-accuracy curve, p in [0, 1]")
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)


def plot_corruption_examples(rob: dict, path: Path, seed: int, example: tuple[bytes, str] | None = None) -> None:
    """One benchmark image under each image corruption, and its caption under each text corruption (``example``:
    a data row's image bytes and text instead)."""
    import io

    from PIL import Image

    from mmfuse import shapes

    plt = _plt()
    if example is None:
        row = shapes.balanced(1, seed)[0]
        png, caption = shapes.png_bytes(row.image), row.caption
    else:
        png, caption = example
    image_names = [c.name for c in C.IMAGE_CORRUPTIONS if c.name in rob["corruptions"]]
    text_names = [c.name for c in C.TEXT_CORRUPTIONS if c.name in rob["corruptions"]]
    levels = [0.0, 0.2, 0.5, 0.8, 1.0]
    lines = [f"{'caption':>18}  {(caption or '(missing)')[:90]}"]
    for name in text_names:
        for p in (0.3, 1.0):
            text = (C.apply(name, p, [png], [caption], seed)[1][0] or "(missing)")[:90]
            lines.append(f"{name + ' ' + format(p, 'g'):>18}  {text}")
    cell, left, top, text_h = 1.25, 1.9, 0.7, 0.16 * len(lines) + 0.3
    width = left + cell * len(levels) + 0.2
    height = top + cell * len(image_names) + text_h
    fig = plt.figure(figsize=(max(width, 6.5), height))
    for r, name in enumerate(image_names):
        for c, p in enumerate(levels):
            ax = fig.add_axes(((left + c * cell) / fig.get_figwidth(), 1 - (top + (r + 1) * cell - 0.12) / height,
                               (cell - 0.15) / fig.get_figwidth(), (cell - 0.3) / height))
            data = C.apply(name, p, [png], [caption], seed)[0][0] if png else b""
            try:
                ax.imshow(np.asarray(Image.open(io.BytesIO(data)).convert("RGB")))
            except Exception:  # noqa: BLE001 - truncated bytes: what the server sees
                ax.text(0.5, 0.5, "undecodable" if data else "missing", ha="center", va="center",
                        transform=ax.transAxes, fontsize=8)
            ax.set_xticks([])
            ax.set_yticks([])
            ax.grid(False)
            if name == "truncated":
                ax.set_xlabel(f"{len(data)}/{len(png)} bytes", fontsize=7)
            if r == 0:
                ax.set_title(f"p = {p:g}")
            if c == 0:
                ax.set_ylabel(C.CORRUPTIONS[name].label, rotation=0, ha="right", va="center")
    fig.text(0.02, text_h / height - 0.02, "\n".join(lines), family="monospace", fontsize=8, va="top")
    if example is None:
        fig.suptitle("The imperfections on one benchmark row (images 64 x 64; text corruptions below)")
    else:
        fig.suptitle("The imperfections on one row of the data (text corruptions below)")
    _save(fig, path)
    plt.close(fig)


def plot_latency(load: dict, path: Path) -> None:
    plt = _plt()
    ensembles = list(dict.fromkeys(r["ensemble"] for r in load["runs"]))
    fig, axes = plt.subplots(2, len(ensembles), figsize=(max(8.5, 3.4 * len(ensembles)), 6.0), squeeze=False)
    for j, ensemble in enumerate(ensembles):
        closed = [r for r in load["runs"] if r["ensemble"] == ensemble and r["mode"] == "closed"]
        opened = [r for r in load["runs"] if r["ensemble"] == ensemble and r["mode"] == "open"]
        ax = axes[0, j]
        x = [r["throughput_per_s"] for r in closed]
        for q, style in (("p50", "-o"), ("p95", "-s"), ("p99", "-^")):
            ax.plot(x, [r["latency_ms"][q] for r in closed], style, ms=4, label=q)
        for r in closed:
            ax.annotate(f"c={r['concurrency']}", (r["throughput_per_s"], r["latency_ms"]["p99"]), fontsize=7,
                        xytext=(2, 3), textcoords="offset points")
        ax.set_title(f"{ensemble}\nclosed loop")
        ax.set_xlabel("throughput (req/s)")
        ax.set_ylabel("latency (ms)")
        ax.legend(fontsize=7)
        ax = axes[1, j]
        if opened:
            rates = [r["rate_per_s"] for r in opened]
            for q, style in (("p50", "-o"), ("p95", "-s"), ("p99", "-^")):
                ax.plot(rates, [r["latency_ms"][q] for r in opened], style, ms=4, label=q)
            ax.plot([], [], " ", label=f"errors: {sum(sum(r['errors'].values()) for r in opened)}")
            ax.legend(fontsize=7)
        ax.set_title("open loop (fixed rate)")
        ax.set_xlabel("offered rate (req/s)")
        ax.set_ylabel("latency (ms)")
    fig.suptitle("Latency percentiles under load (one-row requests, loopback gRPC)")
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)


def _top_closed(load: dict, ensemble: str) -> dict | None:
    closed = [r for r in load["runs"] if r["ensemble"] == ensemble and r["mode"] == "closed"]
    return max(closed, key=lambda r: r["concurrency"]) if closed else None


def plot_breakdown(load: dict, path: Path) -> None:
    plt = _plt()
    ensembles = list(dict.fromkeys(r["ensemble"] for r in load["runs"]))
    rows = sum(len(_top_closed(load, e)["server"]["steps"]) for e in ensembles)
    fig, axes = plt.subplots(1, 2, figsize=(15, 1.4 + 0.4 * rows), gridspec_kw={"width_ratios": [1.4, 1]})
    ax = axes[0]
    labels, queue, compute = [], [], []
    for e in ensembles:
        run = _top_closed(load, e)
        for step, s in run["server"]["steps"].items():
            labels.append(f"{e} / {step}")
            queue.append(s["queue_ms"])
            compute.append(s["compute_ms"])
    y = np.arange(len(labels))
    ax.barh(y, queue, color="tab:red", label="queue")
    ax.barh(y, compute, left=queue, color="tab:blue", label="compute (input + infer + output)")
    ax.set_yticks(y, labels)
    ax.set_ylim(len(labels) - 0.5, -0.5)  # top to bottom, row for row with the heat map
    ax.set_xlabel("ms per request (server statistics)")
    ax.set_title("Per-step time at the highest concurrency")
    ax.legend(fontsize=8)
    ax = axes[1]
    steps = [s for e in ensembles for s in _top_closed(load, e)["server"]["steps"].values()]
    sizes = sorted({int(k) for s in steps for k in s["batch_sizes"]})
    counts = np.array([[s["batch_sizes"].get(str(k), 0) for k in sizes] for s in steps], dtype=float)
    ax.imshow(np.where(counts > 0, counts, np.nan), cmap="Blues", aspect="auto")
    for i in range(counts.shape[0]):
        for j in range(counts.shape[1]):
            if counts[i, j]:
                ax.text(j, i, f"{int(counts[i, j])}", ha="center", va="center", fontsize=8)
    ax.set_xticks(range(len(sizes)), [str(k) for k in sizes])
    ax.set_yticks(range(len(labels)), [])  # the rows of the left plot
    ax.grid(False)
    ax.set_xlabel("batch size formed by dynamic batching")
    ax.set_title("Executions per batch size formed (same rows)")
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)


# -- markdown ----------------------------------------------------------------------------------------------------
def _robustness_md(rob: dict, lines: list[str]) -> None:
    names = list(rob["corruptions"])
    image = [n for n in names if rob["corruptions"][n]["modality"] == "image" and not n.startswith("dropout")]
    text = [n for n in names if rob["corruptions"][n]["modality"] == "text" and not n.startswith("dropout")]
    drop = [n for n in names if n.startswith("dropout")]
    sm = rob["single_modality"]
    lines += [
        "## Robustness", "",
        f"Task: {rob['task']} {rob['dataset']['rows']} rows ({rob['dataset']['per_kind']} per kind: positives, "
        f"relation-swapped and attribute negatives; seed {rob['dataset']['seed']}), the same rows at every level of "
        f"every imperfection, levels {', '.join(f'{p:g}' for p in rob['levels'])}. Accuracy is **balanced accuracy** "
        "(0.5 x positives + 0.5 x the mean of the two negative kinds; chance 0.5); a score of exactly 0.5 (a head "
        "that cannot decide, e.g. a modality missing) counts as \"no match\".", "",
        "Strategies are the trained heads found in the repository, each served in turn by the running server "
        "(parameters only: `load_model` with `strategy` / `head_dir`), every row sent through `fuse_image_text`.", "",
        "| strategy | source | clean | positives | swapped | attribute | image absent | text absent | "
        "AUC image | AUC text | AUC dropout | effective robustness (mean) | flags |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    heads = {h["name"]: h for h in rob["heads"]}
    for s, fig in rob["strategies"].items():
        c = fig["clean"]

        def auc(group: list[str], fig=fig) -> str:
            values = [fig["curves"][n]["relative_robustness"] for n in group]
            return _num(float(np.mean(values)), 3) if values else "-"

        ers = [fig["curves"][n].get("effective_robustness_mean") for n in names]
        er = "(baseline)" if s == rob["baseline"] else (_num(float(np.mean(ers)), 3) if None not in ers else "-")
        absent = {k: fig["retention"].get(f"{k}_absent", {}).get("accuracy") for k in ("image", "text")}
        lines.append(
            f"| {s} | {heads[s]['source']} | {_pct(c['balanced'])} | {_pct(c['by_kind'].get('positive'))} | "
            f"{_pct(c['by_kind'].get('swapped'))} | {_pct(c['by_kind'].get('attribute'))} | {_pct(absent['image'])} | "
            f"{_pct(absent['text'])} | {auc(image)} | {auc(text)} | {auc(drop)} | {er} | {len(fig['flags'])} |")
    img_clean, txt_clean = sm["image"]["clean"]["balanced"], sm["text"]["clean"]["balanced"]
    lines += [
        f"| *image-only model* | single-modality | {_pct(img_clean)} | | | | | | | | | | |",
        f"| *text-only model* | single-modality | {_pct(txt_clean)} | | | | | | | | | | |", "",
        "AUC: relative robustness, the area under the balanced-accuracy curve over p in [0, 1] (trapezoid rule), "
        "averaged over the image corruptions, the text corruptions and the three dropouts; per corruption below. "
        f"Effective robustness: the curve minus the late-fusion curve (`{rob['baseline']}`) shifted to the same "
        "clean accuracy, averaged over levels and corruptions (> 0: degrades more gracefully than late fusion).", "",
        "**Single-modality models** (the reference of retention and of the catastrophic flag): a logistic "
        "regression on one modality's served embedding (`embed_image` or `embed_text`), fitted on a separate "
        f"calibration split ({rob['dataset']['calibration_per_kind']} rows per kind, seed "
        f"{rob['dataset']['calibration_seed']}) with the kinds balanced, evaluated on the same corrupted rows as "
        "the strategies (a missing or undecodable input scores 0.5). On this task the caption must be checked "
        f"against the image: image-only {_pct(img_clean)}, text-only {_pct(txt_clean)} clean"
        + (" (no better than chance)." if max(img_clean, txt_clean) - 0.5 <= 2 * max(
            sm["image"]["clean"]["se"], sm["text"]["clean"]["se"]) else
           " (the captions alone carry some signal: the generator's negatives are not word-for-word like its "
           "positives).") , "",
        "Accuracy is against the clean label. Some imperfections change what the input says (a hue shift turns "
        "a red circle green, an occluder hides an object, a typo turns \"red\" into \"rex\", a dropped word can "
        "drop the relation): a falling positive rate there is partly the model answering for the corrupted "
        "input, and negatives can stay right for the wrong reason. Per-kind curves below show which.", "",
        "**Retention** with a modality absent = (accuracy - 0.5) / (best single-modality clean accuracy - 0.5); "
        "undefined (`n/a`) when no single-modality model is above chance by two standard errors, which is what "
        "this task gives.", "",
    ]
    lines += ["| strategy | retention, image absent | retention, text absent |", "| --- | --- | --- |"]
    for s, fig in rob["strategies"].items():
        r = fig["retention"]

        def cell(key: str, r=r) -> str:
            if key not in r:
                return "-"
            return "n/a" if r[key]["retention"] is None else f"{r[key]['retention']:.2f}"

        lines.append(f"| {s} | {cell('image_absent')} | {cell('text_absent')} |")
    lines += [
        "", "**Catastrophic degradation**: a strategy is flagged at a level where its balanced accuracy is below "
        f"the better single-modality model's under the same condition by more than {M.FLAG_Z} standard errors of "
        "the difference (binomial), i.e. where using the corrupted input does worse than a model that never "
        "looked at one modality.", "",
    ]
    flags = [(s, f) for s, fig in rob["strategies"].items() for f in fig["flags"]]
    if flags:
        lines += ["| strategy | imperfection | p | balanced accuracy | best single-modality |",
                  "| --- | --- | --- | --- | --- |"]
        lines += [f"| {s} | {rob['corruptions'][f['corruption']]['label']} | {f['level']:g} | {_pct(f['accuracy'])} | "
                  f"{_pct(f['single_modality'])} |" for s, f in flags]
    else:
        lines.append("No strategy falls below the single-modality models anywhere.")
    lines += ["", "Relative robustness (AUC) per imperfection:", "",
              "| strategy | " + " | ".join(rob["corruptions"][n]["label"] for n in names) + " |",
              "| --- |" + " --- |" * len(names)]
    for s, fig in rob["strategies"].items():
        lines.append(f"| {s} | " + " | ".join(f"{fig['curves'][n]['relative_robustness']:.3f}" for n in names) + " |")
    if rob.get("not_evaluated"):
        lines += ["", "Not evaluated: " + "; ".join(f"{k}: {v}" for k, v in rob["not_evaluated"].items())]
    lines += ["", "![robustness](robustness.png)", "", "![relative robustness](auc.png)", "",
              "![effective robustness](effective_robustness.png)", ""]
    for s in rob["strategies"]:
        lines += [f"![{s} per kind]({_slug(s)}_kinds.png)", ""]
    lines += ["The imperfections (definitions in `mmfuse/eval/corruptions.py`):", "",
              "| imperfection | modality | level p |", "| --- | --- | --- |"]
    for line in (C.__doc__ or "").splitlines():
        parts = line.split(None, 2)
        if len(parts) == 3 and parts[0] in rob["corruptions"]:
            lines.append(f"| {rob['corruptions'][parts[0]]['label']} | {parts[1]} | {parts[2]} |")
    lines += ["", "![the imperfections on one row](corruptions.png)", ""]


def _data_md(data: dict, lines: list[str]) -> None:
    lines += [
        "## Data", "",
        f"`{data['path']}` (sha256 `{data['sha256']}`), task **{data['task']}**, classes "
        f"{', '.join(f'`{c}`' for c in data['classes'])}: {data['rows_usable']} usable rows, "
        f"**{data['rows_used']} used** ({data['selection']}), **{data['rows_skipped']} skipped**"
        + (f" ({', '.join(f'{n} {r}' for r, n in data['skipped_reasons'].items())})" if data["skipped_reasons"] else "")
        + ".", ""]
    if data.get("rows_per_class"):
        lines += ["Rows used per class: " + ", ".join(f"`{c}` {n}" for c, n in data["rows_per_class"].items()) + ".",
                  ""]
    if data["skipped"]:
        lines += ["| line | why skipped |", "| --- | --- |"]
        lines += [f"| {s['line']} | {s['reason']} |" for s in data["skipped"][:20]]
        if data["rows_skipped"] > 20:
            lines.append(f"| ... | {data['rows_skipped'] - 20} more in report.json (the first 100) |")
        lines.append("")


def _robustness_data_md(rob: dict, lines: list[str]) -> None:
    names = list(rob["corruptions"])
    image = [n for n in names if rob["corruptions"][n]["modality"] == "image" and not n.startswith("dropout")]
    text = [n for n in names if rob["corruptions"][n]["modality"] == "text" and not n.startswith("dropout")]
    drop = [n for n in names if n.startswith("dropout")]
    classes = rob["classes"]
    chance = rob["chance"]
    lines += [
        "## Robustness on the data", "",
        f"Task: {rob['task']} {rob['dataset']['rows']} rows, the same rows at every level of every imperfection, "
        f"levels {', '.join(f'{p:g}' for p in rob['levels'])}. Accuracy is **balanced accuracy**, the mean per-class "
        f"recall (chance {chance:.3g} = 1/{len(classes)}: any constant answer scores it; a head that cannot decide "
        "answers uniform PROBS, whose argmax is the first class, or SCORE 0.5 = no match); macro-F1 beside it.", "",
        "Strategies are the heads of the repository's fusion version folders whose task and classes match the data, "
        "each served in turn by the running server (parameters only: `load_model` with `strategy` / `head_dir` / "
        "`classes`, the ensemble exposing the head's outputs), every row sent through `fuse_image_text`.", "",
        "| strategy | source | output | clean | macro-F1 | image absent | text absent | AUC image | AUC text | "
        "AUC dropout | eff. robustness (mean) | flags |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    heads = {h["name"]: h for h in rob["heads"]}
    for s, fig in rob["strategies"].items():
        c = fig["clean"]

        def auc(group: list[str], fig=fig) -> str:
            values = [fig["curves"][n]["relative_robustness"] for n in group]
            return _num(float(np.mean(values)), 3) if values else "-"

        ers = [fig["curves"][n].get("effective_robustness_mean") for n in names]
        er = "(baseline)" if s == rob["baseline"] else (_num(float(np.mean(ers)), 3) if ers and None not in ers
                                                        else "n/a")
        absent = {k: fig["retention"].get(f"{k}_absent", {}).get("accuracy") for k in ("image", "text")}
        lines.append(
            f"| {s} | {heads[s]['source']} | {fig.get('output', '-')} | {_pct(c['balanced'])} | {_num(c['macro_f1'], 3)} | "
            f"{_pct(absent['image'])} | {_pct(absent['text'])} | {auc(image)} | {auc(text)} | {auc(drop)} | {er} | "
            f"{len(fig['flags'])} |")
    refs = rob["single_modality"]["references"]
    for source, per in refs.items():
        for m in ("image", "text"):
            c = per[m]["clean"]
            lines.append(f"| *{m}-only reference* | {source} | | {_pct(c['balanced'])} | {_num(c['macro_f1'], 3)} "
                         "| | | | | | | |")
    lines += ["", "Clean: balanced accuracy on the clean rows. AUC: relative robustness, the area under the "
              "balanced-accuracy curve over p in [0, 1], averaged over the image corruptions, the text corruptions and "
              "the three dropouts. Effective robustness: the curve minus the late-fusion curve "
              + (f"(`{rob['baseline']}`) shifted to the same clean accuracy, averaged over levels and corruptions."
                 if rob["baseline"] else f"- n/a: {rob['baseline_note']}."), ""]
    lines += ["Recall per class, clean rows:", "",
              "| strategy | " + " | ".join(f"`{c}`" for c in classes) + " |", "| --- |" + " --- |" * len(classes)]
    for s, fig in rob["strategies"].items():
        by = fig["clean"]["by_class"]
        lines.append(f"| {s} | " + " | ".join(_pct(by.get(c)) for c in classes) + " |")
    for per in refs.values():
        for m in ("image", "text"):
            by = per[m]["clean"]["by_class"]
            lines.append(f"| *{m}-only reference* | " + " | ".join(_pct(by.get(c)) for c in classes) + " |")
    lines += ["", "**Single-modality references** (the reference of retention and of the catastrophic flag): the "
              "classifiers `mmfuse train --data` fitted on one modality's pooled embedding on the same training rows "
              "(`references/image`, `references/text` of the head's version folder), run here on the served "
              "embeddings (`embed_image`, `embed_text`) of the same corrupted inputs; a row whose modality is missing "
              "or undecodable gets the constant answer.", "",
              "**Retention** with a modality absent = (balanced accuracy with it removed from every row - chance) / "
              "(the reference of the remaining modality under the same condition - chance); `n/a` when that "
              "reference is not above chance by two standard errors.", "",
              "| strategy | image absent | text-only reference | retention | text absent | image-only reference | "
              "retention |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for s, fig in rob["strategies"].items():
        r = fig["retention"]
        cells = []
        for key in ("image_absent", "text_absent"):
            e = r.get(key)
            if e is None:
                cells += ["-", "-", "n/a"]
            else:
                cells += [_pct(e["accuracy"]), _pct(e.get("reference_accuracy")),
                          "n/a" if e["retention"] is None else f"{e['retention']:.2f}"]
        lines.append(f"| {s} | " + " | ".join(cells) + " |")
        if fig.get("retention_note"):
            lines.append(f"| | {fig['retention_note']} | | | | | |")
    lines += ["", "**Catastrophic degradation**: a strategy is flagged at a level where its balanced accuracy is below "
              f"the better single-modality reference's under the same condition by more than {M.FLAG_Z} standard "
              "errors of the difference.", ""]
    flags = [(s, f) for s, fig in rob["strategies"].items() for f in fig["flags"]]
    if flags:
        lines += ["| strategy | imperfection | p | balanced accuracy | best single-modality |",
                  "| --- | --- | --- | --- | --- |"]
        lines += [f"| {s} | {rob['corruptions'][f['corruption']]['label']} | {f['level']:g} | {_pct(f['accuracy'])} | "
                  f"{_pct(f['single_modality'])} |" for s, f in flags]
    elif rob["strategies"]:
        lines.append("No strategy falls below the single-modality references anywhere.")
    if rob["strategies"]:
        lines += ["", "Relative robustness (AUC) per imperfection:", "",
                  "| strategy | " + " | ".join(rob["corruptions"][n]["label"] for n in names) + " |",
                  "| --- |" + " --- |" * len(names)]
        for s, fig in rob["strategies"].items():
            lines.append(f"| {s} | " + " | ".join(f"{fig['curves'][n]['relative_robustness']:.3f}" for n in names)
                         + " |")
    else:
        lines.append("No head of this task and these classes was evaluated.")
    if rob.get("not_evaluated"):
        lines += ["", "Not evaluated:", ""] + [f"* {k}: {v}" for k, v in rob["not_evaluated"].items()]
    if rob["strategies"]:
        lines += ["", "![robustness](robustness.png)", "", "![relative robustness](auc.png)", ""]
        if rob["baseline"]:
            lines += ["![effective robustness](effective_robustness.png)", ""]
        for s in rob["strategies"]:
            lines += [f"![{s} per class]({_slug(s)}_kinds.png)", ""]
        lines += ["![the imperfections on one row](corruptions.png)", ""]


#: a load run's ``load_generator`` (report.json) -> what made its figures, as the report names it
LOAD_GENERATORS = {
    "perf_analyzer": "Triton's perf_analyzer (C++ client from the tritonclient wheel)",
    "python": "mmfuse's asyncio Python client (mmfuse.loadgen)",
}


def _load_label(r: dict) -> str:
    return f"c={r['concurrency']}" if r["mode"] == "closed" else f"{r['rate_per_s']:g}/s"


def load_generators(load: dict) -> dict[str, list[str]]:
    """Each load generator of the load runs (the strategy-overhead runs too) -> the runs it made, in order. A run
    without ``load_generator`` comes from a report made before perf_analyzer: the asyncio client's."""
    out: dict[str, list[str]] = {}
    for r in list(load["runs"]) + list(load.get("strategy_overhead") or []):
        label = f"{r['ensemble']} {_load_label(r)}" + (f" ({r['strategy']})" if r.get("strategy") else "")
        out.setdefault(r.get("load_generator") or "python", []).append(label)
    return out


def _generator_name(generator: str) -> str:
    return LOAD_GENERATORS.get(generator, f"`{generator}`")


def _generators_text(generators: dict[str, list[str]]) -> str:
    """"by X" for one load generator, "by X for runs...; by Y for runs..." for several."""
    if len(generators) == 1:
        return f"by {_generator_name(next(iter(generators)))}"
    return "; ".join(f"by {_generator_name(g)} for {', '.join(runs)}" for g, runs in generators.items())


def _how_measured(generator: str, b: dict) -> str:
    """How one load generator bounds, loads and times a run (what mmfuse.eval.load and mmfuse.perf_analyzer do)."""
    n, s = b["requests"], b["seconds"]
    if generator == "perf_analyzer":
        return (f"perf_analyzer: each run is one request count (`--request-count`; no warm-up, no measurement "
                f"windows, so no stability check): {n} requests, fewer where {s:g} s bounds the run (at a fixed "
                f"rate, rate x {s:g} s; in a closed loop, the best closed-loop throughput so far x {s:g} s), never "
                "fewer than perf_analyzer accepts (the concurrency; one second of requests at a rate). Closed loop "
                "(`--concurrency-range`, `--sync`): a fixed number of requests in flight. Open loop "
                "(`--request-rate-range`, `--request-distribution constant`, `--async`): requests sent at constant "
                "intervals whatever the answers. Latency from each request's send to its response, throughput "
                "from the first send to the last response (both from perf_analyzer's profile export). A failed "
                "request ends perf_analyzer's run: the errors column then gives its exit status and message, and "
                "the requests Triton saw succeed count as completed. Each run's command line is in `report.json` "
                "(`perf_analyzer.command_line`).")
    if generator == "python":
        return (f"The asyncio client: each run stops at {n} requests or {s:g} s, whichever comes first (the requests "
                "still in flight are waited for). Closed loop: a fixed number of requests in flight (concurrency), "
                "each sent when one completes. Open loop: requests sent on a fixed schedule whatever the answers "
                "(at most 256 outstanding; a due request beyond that is not sent and counts as a `client_backlog` "
                "error). Latency to the response from the send (closed loop) or from the request's due time (open "
                "loop: a client falling behind shows in the latency).")
    return f"`{generator}`: each run bounded to {n} requests and {s:g} s."


def _load_md(load: dict, lines: list[str], configured: str | None = None) -> None:
    """``configured``: the run's --load-generator (report.json's config), named when there is no run to go by."""
    b = load["bounds"]
    generators = load_generators(load) or {configured or "python": []}
    lines += [
        "## Performance under load", "",
        f"One-row requests from a pool of real inputs, sent over loopback gRPC {_generators_text(generators)}. "
        + " ".join(_how_measured(g, b) for g in generators) + " "
        "Memory of the server's process tree (tritonserver and its "
        "python-backend stubs): its proportional set size before the run (PSS: shared pages split between the "
        "processes that map them), the growth of its resident memory (RSS sampled every 50 ms: peak - before), and "
        "that growth per request in flight (most requests in flight at once).", "",
        "| ensemble | load | sent | req/s | p50 ms | p95 ms | p99 ms | errors | server PSS MiB | RSS growth KiB | "
        "KiB per request | fusion share |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in load["runs"]:
        loadtxt = _load_label(r)
        mem = r["memory"]
        per = mem["bytes_per_request_in_flight"]
        growth = None if mem["peak_rss_bytes"] is None else mem["peak_rss_bytes"] - mem["idle_rss_bytes"]
        errors = ", ".join(f"{k}: {v}" for k, v in r["errors"].items()) or "0"
        lines.append(
            f"| {r['ensemble']} | {loadtxt} | {r['sent']} | {_num(r['throughput_per_s'])} | {_num(r['latency_ms']['p50'])} | "
            f"{_num(r['latency_ms']['p95'])} | {_num(r['latency_ms']['p99'])} | {errors} | {_mib(mem.get('idle_pss_bytes'))} | "
            f"{_kib(growth)} | {_kib(per)} | "
            f"{_pct(r['server']['fusion_share'])} |")
    lines += ["", "Fusion share: the fusion step's queue + compute time per request over the ensemble's end-to-end "
              "time per request (Triton's statistics API).", "",
              "Per step, at the highest concurrency (Triton's statistics API, difference over the run; times per "
              "request in ms; batch sizes: executions per size formed by dynamic batching):", "",
              "| ensemble | step | requests | executions | queue | compute input | compute infer | compute output | "
              "mean batch | batch sizes |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for e in dict.fromkeys(r["ensemble"] for r in load["runs"]):
        run = _top_closed(load, e)
        es = run["server"]["ensemble"]
        lines.append(f"| **{e}** (c={run['concurrency']}) | end to end: {es['request_ms']:.2f} ms per request | "
                     f"{es['requests']} | | | | | | | |")
        for step, s in run["server"]["steps"].items():
            sizes = ", ".join(f"{k}x{v}" for k, v in s["batch_sizes"].items())
            lines.append(f"| | {step} | {s['requests']} | {s['executions']} | {s['queue_ms']:.2f} | "
                         f"{s['compute_input_ms']:.2f} | {s['compute_infer_ms']:.2f} | "
                         f"{s['compute_output_ms']:.2f} | {_num(s['mean_batch_rows'], 2)} | {sizes} |")
    if load.get("strategy_overhead"):
        lines += ["", "Fusion overhead per strategy: `fuse_image_text`, closed loop at the highest concurrency, each "
                  "head served in turn:", "",
                  "| strategy | req/s | p50 ms | p95 ms | p99 ms | fusion ms per request | fusion share | fusion mean batch |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        for r in load["strategy_overhead"]:
            fusion = next((s for n, s in r["server"]["steps"].items() if n.startswith("fusion")), None)
            fms = "-" if fusion is None else f"{fusion['queue_ms'] + fusion['compute_ms']:.2f}"
            lines.append(f"| {r['strategy']} | {_num(r['throughput_per_s'])} | {_num(r['latency_ms']['p50'])} | "
                         f"{_num(r['latency_ms']['p95'])} | {_num(r['latency_ms']['p99'])} | {fms} | "
                         f"{_pct(r['server']['fusion_share'])} | {'-' if fusion is None else _num(fusion['mean_batch_rows'], 2)} |")
    pa = load["perf_analyzer"]
    lines += ["", "![latency](latency.png)", "", "![per-step breakdown and batch sizes](breakdown.png)", "",
              "### The same measurements with perf_analyzer", "", _by_hand_text(generators), "", "```bash", pa["setup"]]
    for e, entry in pa["commands"].items():
        lines += [f"# {e}"] + entry["lines"]
    lines += ["```", "", "perf_analyzer prints the same figures: throughput, p50/p90/p95/p99 latency, and the server-side "
              "queue / compute per composing model from the same statistics API (\"Composing models\")."]


def _by_hand_text(generators: dict[str, list[str]]) -> str:
    """What the perf_analyzer command lines are, given what made the figures above."""
    same = "the same ensembles, concurrencies, rates and inputs"
    if set(generators) == {"perf_analyzer"}:
        intro = ("The figures above were already measured by perf_analyzer (`mmfuse eval` ran it once per run). The "
                 f"lines below rerun the same load by hand: {same}, but measured in count windows instead of one "
                 "request count per run.")
    elif "perf_analyzer" in generators:
        others = " and ".join(_generator_name(g) for g in generators if g != "perf_analyzer")
        intro = (f"Some figures above were measured by perf_analyzer, the others by {others}. The lines below "
                 f"measure the same load with perf_analyzer by hand: {same}, in count windows.")
    else:
        intro = (f"The figures above were measured {_generators_text(generators)}. The lines below measure the same "
                 f"load with perf_analyzer (`mmfuse eval`'s default load generator) by hand: {same}, in count "
                 "windows.")
    return (intro + " perf_analyzer ships in the tritonclient wheel; it needs two libraries that the nvidia-pytriton "
            "wheel carries under hashed names (linked by the first lines below; `mmfuse eval` links them in a "
            "folder of the user's cache). Run from the checkout, against the server measured (`URL`; for the "
            "embedded server of `mmfuse eval`, start `mmfuse serve` and use 127.0.0.1:8001). The input files in "
            "`perf_analyzer/` are the very requests sent above, one row each. With `--stability-percentage 50 "
            "--percentile 99` perf_analyzer measures windows until the last three agree within 50 % (max / min) in "
            "throughput and in p99 latency, and exits without a report when ten windows (its default "
            "`--max-trials`) never do: on a busy machine loosen `--stability-percentage` further.")


def _slug(name: str) -> str:
    return "".join(ch if ch.isalnum() else "_" for ch in name).strip("_")


def markdown(report: dict) -> str:
    m = report["machine"]
    lines = [
        "# mmfuse evaluation: fusion beyond accuracy", "",
        f"Made by `{report.get('command') or 'mmfuse eval'}` on {report['created_utc']} in {report['seconds']:.0f} s. "
        f"Machine: {m.get('cpu', m.get('machine'))}, {m.get('cpus')} CPUs, {m.get('memory_gib', '?')} GiB, CPU only; "
        f"load average (1, 5, 15 min) at start {m.get('load_average_at_start')}, at the end "
        f"{m.get('load_average_at_end')}: the machine is shared, so the performance figures are only as quiet as it "
        "was; the robustness figures do not depend on it. Server: "
        f"{'the embedded tritonserver' if report['server']['embedded'] else report['server']['url']} on "
        f"`{report['server']['repository']}` (served fusion: {report['server']['served_fusion']}). Every figure is "
        "in `report.json`; per-row scores in `scores.npz`.", "",
    ]
    if "data" in report:
        _data_md(report["data"], lines)
    if "robustness" in report:
        if report["robustness"].get("mode") == "data":
            _robustness_data_md(report["robustness"], lines)
        else:
            _robustness_md(report["robustness"], lines)
    if "load" in report:
        _load_md(report["load"], lines, (report.get("config") or {}).get("load_generator"))
    return "\n".join(lines) + "\n"


def write_report(report: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    if "robustness" in report and report["robustness"]["strategies"]:
        rob = report["robustness"]
        plot_robustness(rob, out / "robustness.png")
        plot_auc(rob, out / "auc.png")
        if rob["baseline"] is not None or rob.get("mode") != "data":
            plot_effective(rob, out / "effective_robustness.png")
        for s in rob["strategies"]:
            plot_kinds(rob, s, out / f"{_slug(s)}_kinds.png")
        plot_corruption_examples(rob, out / "corruptions.png", rob["dataset"]["seed"], _data_example(report))
    if "load" in report and report["load"]["runs"]:
        plot_latency(report["load"], out / "latency.png")
        plot_breakdown(report["load"], out / "breakdown.png")
    text = json.dumps(_rounded(report), indent=1, default=_json_default)
    # Lists of numbers, and objects holding no list or object, on one line: readable, and half the size.
    text = re.sub(r"\[\s+([-+\d.eE,\s]+?)\s+\]", lambda m: "[" + " ".join(m.group(1).split()) + "]", text)
    text = re.sub(r"\{\n\s+([^{}\[\]]*?)\n\s*\}", lambda m: "{" + " ".join(x.strip() for x in m.group(1).split("\n")) + "}",
                  text)
    (out / "report.json").write_text(text + "\n")
    (out / "report.md").write_text(markdown(report))


def _data_example(report: dict) -> tuple[bytes, str] | None:
    """The row the corruption examples show in data mode (its image read from its path), else None."""
    example = (report.get("data") or {}).get("example")
    if report["robustness"].get("mode") != "data" or not example:
        return None
    image = Path(example["image"]) if example.get("image") else None
    return (image.read_bytes() if image is not None and image.is_file() else b""), example.get("text") or ""


def _rounded(value: Any, digits: int = 6) -> Any:
    """Floats to ``digits`` decimals (the JSON stays readable; figures are not more precise than that)."""
    if isinstance(value, float):
        return round(value, digits)
    if isinstance(value, (np.floating,)):
        return round(float(value), digits)
    if isinstance(value, dict):
        return {k: _rounded(v, digits) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_rounded(v, digits) for v in value]
    return value


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
