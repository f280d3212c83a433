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

On a dataset of the user's own (``mmfuse eval --data``: :class:`DataRows`) the rows are the manifest's, the
figures are per class (recall, balanced accuracy = mean recall, macro-F1), the heads are those whose task and
classes match the data, and the single-modality models are the **reference heads** ``mmfuse train --data``
saved beside each head (``references/image``, ``references/text``: a classifier on one modality's pooled
embedding), applied to the served embeddings of the same corrupted inputs (:class:`ReferenceHeads`).
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
class DataRows:
    """Rows of a manifest (``mmfuse eval --data``): image bytes (b"" = missing), texts ("" = missing), class
    indices into ``classes`` (match: ("0", "1")), and each row's manifest line."""

    images: list[bytes]
    texts: list[str]
    labels: list[int]
    classes: tuple[str, ...]
    task: str
    lines: list[int]
    image_paths: list[str]

    def __len__(self) -> int:
        return len(self.labels)

    @classmethod
    def from_manifest(cls, manifest, limit: int | None = None, seed: int = 0) -> DataRows:
        """The manifest's examples (at most ``limit``: a seeded subset, classes taken in turn, in file order)."""
        examples = list(manifest.examples)
        index = {c: i for i, c in enumerate(manifest.classes)}
        labels = [index[str(e.label)] for e in examples]
        chosen = select_rows(labels, limit, seed)
        examples, labels = [examples[i] for i in chosen], [labels[i] for i in chosen]
        images = [e.image.read_bytes() if e.image is not None else b"" for e in examples]
        return cls(images, [e.text or "" for e in examples], labels, tuple(manifest.classes), manifest.task,
                   [e.line for e in examples], [str(e.image) if e.image is not None else "" for e in examples])

    def example_row(self) -> int:
        """A row with both modalities (the corruption examples' row); 0 if none has both."""
        return next((i for i in range(len(self)) if self.images[i] and self.texts[i]), 0)


def select_rows(labels: Sequence[int], limit: int | None, seed: int) -> list[int]:
    """Indices of at most ``limit`` rows: seeded, each class in turn (stratified), returned in file order."""
    if limit is None or limit >= len(labels):
        return list(range(len(labels)))
    rng = np.random.default_rng(seed)
    per_class: dict[int, list[int]] = {}
    for i in rng.permutation(len(labels)).tolist():
        per_class.setdefault(int(labels[i]), []).append(i)
    queues = [per_class[c] for c in sorted(per_class)]
    picked: list[int] = []
    while len(picked) < limit:
        for q in queues:
            if q and len(picked) < limit:
                picked.append(q.pop(0))
    return sorted(picked)


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


def score_rows(outputs: np.ndarray, data: DataRows) -> dict[str, Any]:
    """Figures of one condition on a dataset of the user's own: per-class recall, balanced accuracy (mean
    recall), its standard error, accuracy and macro-F1."""
    predicted = M.predicted_classes(outputs)
    counts = M.class_counts(predicted, data.labels, data.classes)
    by_class = M.recall_by_class(counts)
    return {"by_class": by_class, "balanced": M.class_balanced_accuracy(by_class), "se": M.class_balanced_se(counts),
            "accuracy": float(np.mean(predicted == np.asarray(data.labels))) if len(data) else 0.0,
            "macro_f1": M.macro_f1(predicted, data.labels, len(data.classes)), "counts": counts}


def group_key(result: dict[str, Any]) -> str:
    """``by_kind`` (shapes benchmark) or ``by_class`` (a dataset of the user's own)."""
    return "by_class" if "by_class" in result else "by_kind"


def curves(results: dict[str, dict], names: Sequence[str], levels: Sequence[float]) -> dict[str, dict]:
    """Per corruption: the level-ordered figures, from per-condition results keyed by condition key."""
    out = {}
    for name in names:
        rows = [results[condition_key(name, p)] for p in levels]
        key = group_key(rows[0])
        kinds = list(rows[0][key])
        out[name] = {
            "levels": list(levels),
            "balanced": [r["balanced"] for r in rows],
            "se": [r["se"] for r in rows],
            key: {k: [r[key].get(k) for r in rows] for k in kinds},
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


def evaluate_strategy(client, options, head: Head | None, switcher, conds: list[Condition], data: Dataset | DataRows,
                      batch: int, in_flight: int, progress: Callable[[int], None] | None = None,
                      task: str = "match", label_check: dict | None = None) -> dict[str, np.ndarray]:
    """Serve ``head`` (None: what the server serves), send every condition's rows through fuse_image_text;
    SCORE ([N], match) or PROBS ([N, C], classify) per condition key. For classify, ``label_check`` (a dict)
    receives how many answered LABELs equal the class of highest PROBS (rows with something present)."""
    if head is not None:
        switcher.use(head)
    images = [x for c in conds for x in c.images]
    texts = [t for c in conds for t in c.texts]
    outputs = ["PROBS", "LABEL", "MODALITY_MASK"] if task == "classify" else ["SCORE", "MODALITY_MASK"]
    out = run_rows(client, options, ENSEMBLE, {"IMAGE": images, "TEXT": texts}, outputs, batch, in_flight, progress)
    n = len(data)
    if task == "classify":
        probs = out["PROBS"].reshape(len(images), -1).astype(np.float32)
        if label_check is not None:
            classes = np.asarray(getattr(data, "classes", ()), dtype=object)
            labels = np.asarray([v.decode() if isinstance(v, bytes) else str(v) for v in out["LABEL"].reshape(-1)],
                                dtype=object)
            answered = out["MODALITY_MASK"].reshape(len(images), -1).any(axis=1)
            if len(classes) == probs.shape[1]:
                label_check.update(rows=int(answered.sum()), agree=int(np.sum(
                    labels[answered] == classes[probs[answered].argmax(axis=1)])),
                    empty_where_nothing_present=int(np.sum(labels[~answered] == "")), nothing_present=int(
                        np.sum(~answered)))
        return {c.key: probs[i * n : (i + 1) * n] for i, c in enumerate(conds)}
    scores = out["SCORE"].reshape(-1)
    return {c.key: scores[i * n : (i + 1) * n].astype(np.float32) for i, c in enumerate(conds)}


def figures(per_condition_scores: dict[str, np.ndarray], data: Dataset | DataRows, names: Sequence[str],
            levels: Sequence[float]) -> dict[str, Any]:
    score = score_rows if isinstance(data, DataRows) else score_condition
    results = {key: score(s, data) for key, s in per_condition_scores.items()}
    return {"clean": results["clean"], "conditions": results, "curves": curves(results, names, levels)}


# -- the single-modality reference heads of a dataset of the user's own ------------------------------------------
REFERENCES = "references"


def reference_dir(head_path: Path, modality: str) -> Path:
    return Path(head_path) / REFERENCES / modality


def has_references(head_path: Path) -> bool:
    from mmfuse.serving.strategies.base import HEAD_CONFIG

    return all((reference_dir(head_path, m) / HEAD_CONFIG).is_file() for m in ("image", "text"))


class ReferenceHeads:
    """``references/image`` and ``references/text`` of a head's version folder (``mmfuse train --data``), run in
    this process on the served pooled embeddings (``embed_image`` / ``embed_text``) of the same inputs; a row
    whose modality is missing or undecodable gets the constant answer (uniform PROBS, or SCORE 0.5)."""

    def __init__(self, head_path: Path):
        from mmfuse.serving.strategies import load_head

        self.path = Path(head_path)
        self.heads = {m: load_head(reference_dir(head_path, m))[0] for m in ("image", "text")}

    def outputs(self, cache: EmbeddingCache, condition: Condition) -> dict[str, np.ndarray]:
        import torch

        from mmfuse.serving.fusion import module_batch

        out = {}
        for modality, values in (("image", condition.images), ("text", condition.texts)):
            head = self.heads[modality]
            name = modality.upper()
            emb, valid = cache.get(modality, values)
            batch = module_batch({f"{name}_EMBEDDING": emb, f"{name}_VALID": valid.reshape(-1, 1)}, (name,), False)
            with torch.no_grad():
                logit = head(batch).logit.float()
            if head.task == "classify":
                probs = torch.softmax(logit, -1).numpy()
                probs[~valid] = 1.0 / probs.shape[1]
            else:
                probs = np.where(valid, torch.sigmoid(logit).numpy().reshape(-1), 0.5)
            out[modality] = probs.astype(np.float32)
        return out


def compare(strategies: dict[str, dict], single: dict[str, dict] | None, baseline: str | None, names: Sequence[str],
            levels: Sequence[float], chance: float = M.CHANCE, singles: dict[str, dict[str, dict]] | None = None,
            retention_reference: str = "best_clean") -> None:
    """Add effective robustness, retention and catastrophic-degradation flags to each strategy's figures.

    ``single``: the image-only and text-only figures every strategy is held against, or per strategy in
    ``singles`` (a strategy in neither gets no flags and no retention). ``retention_reference``:
    ``best_clean`` (the better single-modality model on clean rows: the shapes benchmark) or ``remaining``
    (the reference of the modality left, under the same condition: a dataset of the user's own)."""
    for strategy, fig in strategies.items():
        own = (singles or {}).get(strategy, single)
        if own is None:
            fig["flags"], fig["retention"] = [], {}
            for corruption in names:
                curve = fig["curves"][corruption]
                if baseline is not None:
                    er = M.effective_robustness(curve["balanced"], strategies[baseline]["curves"][corruption]["balanced"])
                    curve["effective_robustness"] = er
                    curve["effective_robustness_mean"] = float(np.mean(er))
                curve["flagged_levels"] = []
            continue
        _compare_one(fig, strategies, own, baseline, names, levels, chance, retention_reference)


def _compare_one(fig: dict, strategies: dict[str, dict], single: dict[str, dict], baseline: str | None,
                 names: Sequence[str], levels: Sequence[float], chance: float, retention_reference: str) -> None:
    best_clean = max(single["image"]["clean"]["balanced"], single["text"]["clean"]["balanced"])
    best_clean_se = next(s["clean"]["se"] for s in (single["image"], single["text"])
                         if s["clean"]["balanced"] == best_clean)
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
    for absent, remaining, condition in (("image", "text", "dropout_image@1.0"), ("text", "image", "dropout_text@1.0")):
        if condition in fig["conditions"]:
            acc = fig["conditions"][condition]["balanced"]
            if retention_reference == "remaining":
                ref = single[remaining]["conditions"].get(condition, single[remaining]["clean"])
                fig["retention"][f"{absent}_absent"] = {
                    "accuracy": acc, "reference": f"{remaining}-only reference", "reference_accuracy":
                    ref["balanced"], "retention": M.retention(acc, ref["balanced"], ref["se"], chance)}
            else:
                fig["retention"][f"{absent}_absent"] = {
                    "accuracy": acc, "best_single_modality": best_clean,
                    "retention": M.retention(acc, best_clean, best_clean_se, chance)}
