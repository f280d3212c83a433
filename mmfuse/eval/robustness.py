"""Robustness of each served fusion strategy on the shapes benchmark, MultiBench-style.

For every trained head, served in turn by the running server, the same rows go through
``fuse_image_text`` under every corruption at every level, and the match SCORE is scored per kind.
Beside the strategies:

* the **late-fusion baseline** of effective robustness: a trained ``late`` similarity head if the
  repository has one, else one fitted here (a logistic on the image-text cosine: two numbers, fitted on
  a calibration split of the served embeddings, saved with ``save_head`` in ``OUT/heads/late-fitted``
  and served like any head);
* the **single-modality models**: a logistic regression on one modality's served embedding
  (``embed_image`` / ``embed_text``), fitted on the calibration split; under a corruption each sees
  the same corrupted input; a row whose modality is missing or undecodable gets 0.5.
"""
from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mmfuse import shapes

from . import corruptions as C
from . import metrics as M
from .served_heads import ENSEMBLE, Head, run_rows


@dataclass
class Dataset:
    images: list[bytes]
    texts: list[str]
    labels: list[int]
    kinds: list[str]

    @classmethod
    def generate(cls, per_kind: int, seed: int) -> Dataset:
        examples = shapes.balanced(per_kind, seed)
        return cls([shapes.png_bytes(e.image) for e in examples], [e.caption for e in examples],
                   [e.label for e in examples], [e.kind for e in examples])

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class Condition:
    corruption: str  # "clean" for p = 0 (shared by every curve)
    level: float
    images: list[bytes]
    texts: list[str]

    @property
    def key(self) -> str:
        return "clean" if self.corruption == "clean" else f"{self.corruption}@{self.level:.1f}"


def conditions(data: Dataset, names: Sequence[str], levels: Sequence[float], seed: int) -> list[Condition]:
    out = [Condition("clean", 0.0, list(data.images), list(data.texts))]
    for name in names:
        for level in levels:
            if level > 0:
                images, texts = C.apply(name, level, data.images, data.texts, seed)
                out.append(Condition(name, level, images, texts))
    return out


def condition_key(corruption: str, level: float) -> str:
    return "clean" if level == 0 else f"{corruption}@{level:.1f}"


# -- figures from scores -------------------------------------------------------------------------------------
def score_condition(scores: np.ndarray, data: Dataset) -> dict[str, Any]:
    counts = M.kind_counts(scores, data.labels, data.kinds)
    by_kind = M.accuracy_by_kind(counts)
    return {"by_kind": by_kind, "balanced": M.balanced_accuracy(by_kind), "se": M.balanced_se(by_kind, counts),
            "counts": counts}


def curves(results: dict[str, dict], names: Sequence[str], levels: Sequence[float]) -> dict[str, dict]:
    """Per corruption: the level-ordered figures, from per-condition results keyed by condition key."""
    out = {}
    for name in names:
        rows = [results[condition_key(name, p)] for p in levels]
        kinds = list(rows[0]["by_kind"])
        out[name] = {
            "levels": list(levels),
            "balanced": [r["balanced"] for r in rows],
            "se": [r["se"] for r in rows],
            "by_kind": {k: [r["by_kind"][k] for r in rows] for k in kinds},
            "relative_robustness": M.relative_robustness(levels, [r["balanced"] for r in rows]),
        }
    return out


# -- the single-modality models and the fitted late baseline -----------------------------------------------------
class EmbeddingCache:
    """Served embeddings of distinct inputs (corruptions leave many rows unchanged: each is embedded once)."""

    def __init__(self, client, options, batch: int, in_flight: int):
        self.client, self.options, self.batch, self.in_flight = client, options, batch, in_flight
        self.values: dict[tuple[str, bytes], tuple[np.ndarray, bool]] = {}

    @staticmethod
    def _key(value: bytes | str) -> bytes:
        raw = value.encode() if isinstance(value, str) else value
        return hashlib.sha256(raw).digest()

    def fill(self, modality: str, values: Sequence[bytes | str], progress: Callable[[int], None] | None = None):
        todo: dict[bytes, bytes | str] = {}
        for v in values:
            k = self._key(v)
            if (modality, k) not in self.values and k not in todo:
                todo[k] = v
        if not todo:
            return
        ensemble, tensor = ("embed_image", "IMAGE") if modality == "image" else ("embed_text", "TEXT")
        keys, items = list(todo), list(todo.values())
        out = run_rows(self.client, self.options, ensemble, {tensor: items}, ["EMBEDDING", "VALID"],
                       self.batch, self.in_flight, progress)
        for k, e, ok in zip(keys, out["EMBEDDING"], out["VALID"].reshape(-1)):
            self.values[(modality, k)] = (e.astype(np.float32), bool(ok))

    def get(self, modality: str, values: Sequence[bytes | str]) -> tuple[np.ndarray, np.ndarray]:
        pairs = [self.values[(modality, self._key(v))] for v in values]
        return np.stack([p[0] for p in pairs]), np.asarray([p[1] for p in pairs])


@dataclass
class SingleModality:
    image_weights: np.ndarray
    text_weights: np.ndarray
    calibration: dict[str, Any] = field(default_factory=dict)

    def scores(self, cache: EmbeddingCache, condition: Condition) -> dict[str, np.ndarray]:
        img, img_ok = cache.get("image", condition.images)
        txt, txt_ok = cache.get("text", condition.texts)
        return {"image": M.logistic_scores(self.image_weights, img, img_ok),
                "text": M.logistic_scores(self.text_weights, txt, txt_ok)}


def fit_single_modality(cache: EmbeddingCache, calibration: Dataset) -> SingleModality:
    weights = M.balanced_weights(calibration.labels, calibration.kinds)
    img, _ = cache.get("image", calibration.images)
    txt, _ = cache.get("text", calibration.texts)
    y = np.asarray(calibration.labels)
    wi, wt = M.fit_logistic(img, y, sample_weight=weights), M.fit_logistic(txt, y, sample_weight=weights)
    fit = {"image": M.logistic_scores(wi, img, np.ones(len(y), bool)),
           "text": M.logistic_scores(wt, txt, np.ones(len(y), bool))}
    return SingleModality(wi, wt, {m: score_condition(s, calibration)["balanced"] for m, s in fit.items()})


def fit_late_head(cache: EmbeddingCache, calibration: Dataset, out_dir: Path, seed: int) -> Head:
    """The late-fusion similarity head (logistic on the image-text cosine), fitted on the calibration split."""
    import torch

    from mmfuse.serving.strategies import build, save_head

    img, _ = cache.get("image", calibration.images)
    txt, _ = cache.get("text", calibration.texts)
    cos = np.sum(img * txt, axis=1) / np.maximum(np.linalg.norm(img, axis=1) * np.linalg.norm(txt, axis=1), 1e-12)
    w = M.fit_logistic(cos[:, None], np.asarray(calibration.labels), l2=1e-4,
                       sample_weight=M.balanced_weights(calibration.labels, calibration.kinds))
    module = build("late", ("IMAGE", "TEXT"), int(img.shape[1]), gate="fixed", head="similarity")
    with torch.no_grad():
        module.scale.fill_(float(w[0]))
        module.bias.fill_(float(w[1]))
    record = {"training": {"config": {"preset": "late"},
                           "command": "mmfuse eval (fitted: logistic regression on the served image-text cosine)",
                           "calibration": {"rows": len(calibration), "seed": seed},
                           "scale": float(w[0]), "bias": float(w[1])}}
    path = save_head(module.eval(), out_dir, extra=record)
    return Head("late (fitted)", "late", path.resolve(), "fitted by mmfuse eval", {**module.describe(), **record})


def evaluate_strategy(client, options, head: Head | None, switcher, conds: list[Condition], data: Dataset,
                      batch: int, in_flight: int, progress: Callable[[int], None] | None = None) -> dict[str, np.ndarray]:
    """Serve ``head`` (None: what the server serves), send every condition's rows through fuse_image_text;
    SCORE per condition key."""
    if head is not None:
        switcher.use(head)
    images = [x for c in conds for x in c.images]
    texts = [t for c in conds for t in c.texts]
    out = run_rows(client, options, ENSEMBLE, {"IMAGE": images, "TEXT": texts}, ["SCORE", "MODALITY_MASK"],
                   batch, in_flight, progress)
    scores = out["SCORE"].reshape(-1)
    n = len(data)
    return {c.key: scores[i * n : (i + 1) * n].astype(np.float32) for i, c in enumerate(conds)}


def figures(per_condition_scores: dict[str, np.ndarray], data: Dataset, names: Sequence[str],
            levels: Sequence[float]) -> dict[str, Any]:
    results = {key: score_condition(s, data) for key, s in per_condition_scores.items()}
    return {"clean": results["clean"], "conditions": results, "curves": curves(results, names, levels)}


def compare(strategies: dict[str, dict], single: dict[str, dict], baseline: str | None, names: Sequence[str],
            levels: Sequence[float]) -> None:
    """Add effective robustness, retention and catastrophic-degradation flags to each strategy's figures."""
    best_clean = max(single["image"]["clean"]["balanced"], single["text"]["clean"]["balanced"])
    best_clean_se = next(s["clean"]["se"] for s in (single["image"], single["text"])
                         if s["clean"]["balanced"] == best_clean)
    for fig in strategies.values():
        flags = []
        for corruption in names:
            curve = fig["curves"][corruption]
            if baseline is not None:
                late = strategies[baseline]["curves"][corruption]["balanced"]
                er = M.effective_robustness(curve["balanced"], late)
                curve["effective_robustness"] = er
                curve["effective_robustness_mean"] = float(np.mean(er))
            reference = []
            for i, level in enumerate(levels):
                key = condition_key(corruption, level)
                a, b = single["image"]["conditions"][key], single["text"]["conditions"][key]
                best = a if a["balanced"] >= b["balanced"] else b
                reference.append(best["balanced"])
                if M.catastrophic(curve["balanced"][i], curve["se"][i], best["balanced"], best["se"]):
                    flags.append({"corruption": corruption, "level": level, "accuracy": curve["balanced"][i],
                                  "single_modality": best["balanced"]})
            curve["single_modality"] = reference
            curve["flagged_levels"] = [f["level"] for f in flags if f["corruption"] == corruption]
        fig["flags"] = flags
        fig["retention"] = {}
        for absent, condition in (("image", "dropout_image@1.0"), ("text", "dropout_text@1.0")):
            if condition in fig["conditions"]:
                acc = fig["conditions"][condition]["balanced"]
                fig["retention"][f"{absent}_absent"] = {
                    "accuracy": acc, "best_single_modality": best_clean,
                    "retention": M.retention(acc, best_clean, best_clean_se)}
