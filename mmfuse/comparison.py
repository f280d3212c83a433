"""``mmfuse compare --data``: every strategy trained on the same cached features, with and without modality
dropout, scored on the same test rows.

Per (strategy, dropout) row of the table:

* clean accuracy (macro-F1 for classify), and accuracy with the image / the text removed from every test row;
* retention with a modality removed: ``(acc - chance) / (ref - chance)``, where ``ref`` is the single-modality
  reference head of the modality that remains (trained on the same rows) and chance the most frequent test
  label's share; 1.0 = as good as the best that modality alone gave, undefined when that reference is not above
  chance by 2 standard errors;
* catastrophic: the accuracy with a modality removed is below that remaining modality's reference by more than
  1.96 standard errors of the difference;
* dropout AUC: the area under the accuracy curve when each modality of each test row is removed with
  probability p, p = 0, 0.25, ..., 1 (seeded; the same draws for every strategy), divided by its width;
* fusion step per row: the served fusion handler, in this process, on batches of 32 test rows, 1 thread;
* head size: parameters and the bytes of its safetensors file.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import numpy as np

DROPOUT_LEVELS = (0.0, 0.25, 0.5, 0.75, 1.0)
FLAG_Z = 1.96
LATENCY_BATCH = 32


def retention(acc: float, ref: dict[str, float], chance: float) -> float | None:
    if ref["accuracy"] - chance <= 2 * ref["se"]:
        return None
    return (acc - chance) / (ref["accuracy"] - chance)


def catastrophic(absent: dict[str, float], ref: dict[str, float]) -> bool:
    return absent["accuracy"] < ref["accuracy"] - FLAG_Z * math.sqrt(absent["se"] ** 2 + ref["se"] ** 2)


def dropout_curve(head, split, task: str, seed: int) -> list[float]:
    """Accuracy when every modality of every row is removed with probability p, for each p in DROPOUT_LEVELS."""
    import torch

    from mmfuse.serving.fusion import module_batch

    from .fit import scores

    names = split.cache.modalities
    draws = np.random.default_rng(seed).random((len(split.rows), len(names)))
    curve = []
    with torch.no_grad():
        for p in DROPOUT_LEVELS:
            keep = draws >= p
            probs = []
            for start in range(0, len(split.rows), 256):
                part = slice(start, start + 256)
                batch = module_batch(split.cache.batch(split.rows[part]), names, head.needs_sequences, "compare",
                                     keep[part])
                logit = head(batch).logit
                probs.append(torch.softmax(logit, -1).numpy() if task == "classify" else torch.sigmoid(logit).numpy())
            curve.append(scores(task, np.concatenate(probs), split.labels)["accuracy"])
    return curve


def fusion_seconds_per_row(head, split, repeats: int = 5) -> float:
    """The served fusion handler (FusionHandler, the head loaded from its saved folder) on batches of test rows."""
    import tempfile
    from pathlib import Path

    import torch

    from mmfuse.serving.fusion import FusionConfig, FusionHandler
    from mmfuse.serving.strategies import save_head

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with tempfile.TemporaryDirectory() as folder:
            save_head(head, Path(folder))
            config = FusionConfig(head.name, tuple(head.modalities), (1.0,) * len(head.modalities), True, Path(folder))
            handler = FusionHandler(config)
        rows = split.rows[:LATENCY_BATCH]
        batch = split.cache.batch(rows)
        requested = frozenset({"FUSED", "MODALITY_MASK", "MODALITY_STATUS", *("PROBS", "LABEL")}
                              if head.task == "classify" else {"FUSED", "MODALITY_MASK", "MODALITY_STATUS", "SCORE"})
        handler(batch, requested)  # warm
        best = float("inf")
        for _ in range(repeats):
            started = time.perf_counter()
            handler(batch, requested)
            best = min(best, time.perf_counter() - started)
        return best / len(rows)
    finally:
        torch.set_num_threads(previous)


def head_size(head) -> dict[str, int]:
    params = sum(p.numel() for p in head.state_dict().values())
    return {"parameters": int(params), "bytes": int(sum(v.numel() * v.element_size() for v in head.state_dict().values()))}


def compare(prepared, test, presets: Sequence[str], dropout: float, base_cfg,
            say: Callable[[str], None] = print) -> dict[str, Any]:
    """Train every preset with dropout 0 and ``dropout`` on ``prepared.train``; score each on ``test``."""
    from .eval.metrics import relative_robustness
    from .fit import chance, fit_head, fit_references
    from .train_data import bar, evaluate

    task, classes, train = prepared.task, prepared.classes, prepared.train
    level = chance(task, test.labels, len(classes))
    say(f"single-modality references on {len(train.rows)} training rows ...")
    refs = fit_references(base_cfg, train.cache, train.rows, train.labels, classes)
    references = {m: evaluate(r, test, task, classes, (m,))["clean"] for m, r in refs.items()}
    names = train.cache.modalities
    results = []
    for preset in presets:
        for p in dict.fromkeys((0.0, dropout)):
            cfg = replace(base_cfg, preset=preset, modality_dropout=p)
            steps = cfg.steps_for(len(train.rows))
            started = time.monotonic()
            head, fitted = fit_head(cfg, train.cache, train.rows, train.labels, classes,
                                    bar(steps, f"{preset}, dropout {p}"))
            figures = evaluate(head, test, task, classes)
            entry: dict[str, Any] = {"strategy": preset, "modality_dropout": p, "train_seconds": fitted["seconds"],
                                     "steps": fitted["steps"], **{k: v for k, v in figures.items()}}
            entry["retention"], entry["catastrophic"] = {}, {}
            for m in names:
                others = [o for o in names if o != m]
                if len(others) != 1 or others[0] not in references:
                    continue
                absent, ref = figures[f"no_{m.lower()}"], references[others[0]]
                entry["retention"][f"no_{m.lower()}"] = retention(absent["accuracy"], ref, level)
                entry["catastrophic"][f"no_{m.lower()}"] = catastrophic(absent, ref)
            curve = dropout_curve(head, test, task, base_cfg.seed + 1)
            entry["dropout_curve"] = dict(zip(map(str, DROPOUT_LEVELS), curve))
            entry["dropout_auc"] = relative_robustness(DROPOUT_LEVELS, curve)
            entry["fusion_ms_per_row"] = 1e3 * fusion_seconds_per_row(head, test)
            entry["head"] = head_size(head)
            say(f"{preset} (dropout {p}): clean {figures['clean']['accuracy']:.3f}, "
                + ", ".join(f"{k} {v['accuracy']:.3f}" for k, v in figures.items() if k != "clean")
                + f" ({time.monotonic() - started:.0f} s)")
            results.append(entry)
    return {"task": task, "classes": list(classes), "chance": level, "references": references, "results": results,
            "train": train.describe(), "test": test.describe(), "config": base_cfg.record(),
            "dropout_levels": list(DROPOUT_LEVELS)}


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1%}"


def table(report: dict[str, Any]) -> str:
    """The comparison as a Markdown table (one row per strategy and dropout)."""
    names = [k[3:] for k in report["results"][0] if k.startswith("no_")] if report["results"] else []
    metric = "acc / macro-F1" if report["task"] == "classify" else "accuracy"
    header = (["strategy", "dropout", f"clean {metric}"] + [f"no {m}" for m in names]
              + [f"retention no {m}" for m in names] + ["dropout AUC", "fusion ms/row", "head params"])
    rows = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for r in report["results"]:
        clean = r["clean"]
        cells = [r["strategy"], f"{r['modality_dropout']:g}",
                 f"{clean['accuracy']:.1%}" + (f" / {clean['macro_f1']:.2f}" if "macro_f1" in clean else "")]
        for m in names:
            flag = " ⚠" if r["catastrophic"].get(f"no_{m}") else ""
            cells.append(f"{r[f'no_{m}']['accuracy']:.1%}{flag}")
        cells += [_pct(r["retention"].get(f"no_{m}")) for m in names]
        cells += [f"{r['dropout_auc']:.3f}", f"{r['fusion_ms_per_row']:.3f}", f"{r['head']['parameters']:,}"]
        rows.append("| " + " | ".join(cells) + " |")
    refs = ", ".join(f"{m.lower()} only {v['accuracy']:.1%}" for m, v in report["references"].items())
    rows.append("")
    rows.append(f"Task {report['task']}, {report['test']['rows']} test rows; chance (most frequent label) "
                f"{report['chance']:.1%}; single-modality references: {refs}. ⚠ = catastrophic: below the remaining "
                "modality's reference by more than 1.96 standard errors.")
    return "\n".join(rows)
