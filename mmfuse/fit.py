"""Fusion heads fitted on a dataset's cached features (``mmfuse train --data``, ``mmfuse compare --data``).

The encoders are the repository's, frozen, run once by :mod:`mmfuse.features` exactly as the server runs
them; a head here sees exactly the tensors the served fusion model sees (``module_batch``, the served
handler's own conversion). Seeded; progress through a callback.

* ``fit_head``: one strategy's head for ``match`` (binary cross-entropy; a row missing a modality cannot be
  judged, its target is 0.5) or ``classify`` (cross-entropy over the named classes; a row keeps its label with
  a modality missing: what remains is informative), with optional modality dropout (each modality of each
  training row dropped with probability p, independently; a row left with nothing is not a training signal);
* ``fit_references``: the single-modality reference heads on the same rows (a linear classifier on one
  modality's pooled embedding, fitted to convergence: a ``late`` strategy with a ``classifier`` head over that
  modality alone, as the server would run it);
* ``predict`` / ``scores``: the head's probabilities with a modality removed or not, accuracy, macro-F1.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F

from mmfuse.presets import preset_hparams
from mmfuse.serving.fusion import module_batch
from mmfuse.serving.strategies import FusionStrategy, build

# Measured on the classify dataset (2,000 rows, 20 epochs): the pooled-embedding heads reach their accuracy at 1e-2
# (late at 1e-3 stays 15-25 points lower); the token strategies train well at 1e-3.
DEFAULT_LR = {"late": 1e-2, "late-gmu": 1e-2, "early": 1e-2, "hybrid": 1e-3, "attention": 1e-3,
              "attention-llava": 1e-3}
REFERENCE_OPTIONS = {"gate": "fixed", "head": "classifier", "normalize": False}


@dataclass
class FitConfig:
    preset: str = "attention"
    task: str = "classify"
    steps: int = 0  # 0: from epochs
    epochs: float = 20.0
    batch_size: int = 64
    lr: float | None = None  # None: DEFAULT_LR of the preset
    weight_decay: float = 0.01
    modality_dropout: float = 0.0
    seed: int = 0
    threads: int = 1
    options: dict[str, Any] = field(default_factory=dict)  # strategy hyper-parameter overrides

    def lr_for(self) -> float:
        return self.lr if self.lr else DEFAULT_LR.get(self.preset, 1e-3)

    def steps_for(self, rows: int) -> int:
        return self.steps or max(1, math.ceil(self.epochs * rows / self.batch_size))

    def record(self) -> dict[str, Any]:
        return asdict(self)


def label_array(labels: Sequence[Any], task: str, classes: Sequence[str]) -> np.ndarray:
    """Class indices (classify, in ``classes`` order) or 0/1 (match)."""
    if task == "classify":
        index = {c: i for i, c in enumerate(classes)}
        return np.asarray([index[str(v)] for v in labels], dtype=np.int64)
    return np.asarray([int(v) for v in labels], dtype=np.int64)


def feature_shapes(cache) -> dict[str, int]:
    """Widths the presets need, read off the cached features: embed_dim, image/text token width, image tokens."""
    one = cache.batch([0])
    shapes = {"embed_dim": int(one[f"{cache.modalities[0]}_EMBEDDING"].shape[-1])}
    for key, name in (("image", "IMAGE"), ("text", "TEXT")):
        seq = one.get(f"{name}_SEQUENCE")
        if seq is not None:
            shapes[f"{key}_width"] = int(seq.shape[-1])
            if key == "image":
                shapes["image_tokens"] = int(seq.shape[1])
    return shapes


def build_head(cfg: FitConfig, classes: Sequence[str], modalities: Sequence[str], shapes: dict[str, int]) -> FusionStrategy:
    hparams = preset_hparams(cfg.preset, shapes.get("image_width", 0), shapes.get("text_width", 0),
                             shapes.get("image_tokens", 0), task=cfg.task, classes=classes, overrides=cfg.options)
    needs_sequences = hparams.pop("_needs_sequences", False)
    if needs_sequences and "image_width" not in shapes:
        raise ValueError(f"strategy {cfg.preset!r} reads token sequences, but the cached features have none "
                         "(the encoders give no SEQUENCE)")
    # The pooled-embedding strategies (late, early) whiten their inputs; not a similarity head, whose cosine needs
    # the encoders' shared space (each modality whitened on its own would lose the alignment).
    hparams.setdefault("whiten", not needs_sequences and hparams.get("head") != "similarity")
    return build(cfg.preset.split("-")[0], tuple(modalities), shapes["embed_dim"], **hparams)


def drop_mask(rows: int, modalities: int, p: float, generator: torch.Generator) -> np.ndarray:
    """[B, M] keep-mask: each modality kept with probability 1 - p, independently."""
    if p <= 0:
        return np.ones((rows, modalities), dtype=bool)
    return (torch.rand(rows, modalities, generator=generator) >= p).numpy()


def task_loss(head: FusionStrategy, logit: torch.Tensor, labels: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    some = present.any(dim=1)
    if not some.any():
        return logit.sum() * 0.0
    if head.task == "classify":
        return F.cross_entropy(logit[some], labels[some])
    target = torch.where(present.all(dim=1), labels.float(), torch.full_like(labels, 0.5, dtype=torch.float32))
    return F.binary_cross_entropy_with_logits(logit, target)


def fit_head(cfg: FitConfig, cache, rows: np.ndarray, labels: np.ndarray, classes: Sequence[str],
             progress: Callable[[int, float], None] | None = None, head: FusionStrategy | None = None,
             modalities: Sequence[str] | None = None) -> tuple[FusionStrategy, dict[str, Any]]:
    """Train one head on ``rows`` of the cache; returns it (eval mode) and a record (steps, seconds, losses)."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    names = tuple(modalities or cache.modalities)
    if head is None:
        head = build_head(cfg, classes, names, feature_shapes(cache))
        if head.whiten:
            pooled, present = cache.pooled()
            order = [cache.modalities.index(m) for m in names]
            head.set_input_statistics(pooled[rows][:, order], present[rows][:, order])
    head.train()
    lr = cfg.lr_for()
    optimizer = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=cfg.weight_decay)
    steps = cfg.steps_for(len(rows))
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.1)
    generator = torch.Generator().manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    order, at = rng.permutation(len(rows)), 0
    losses: list[float] = []
    started = time.monotonic()
    for step in range(steps):
        if at + cfg.batch_size > len(order):
            order, at = rng.permutation(len(rows)), 0
        picked = order[at : at + cfg.batch_size]
        at += cfg.batch_size
        keep = drop_mask(len(picked), len(names), cfg.modality_dropout, generator)
        batch = module_batch(cache.batch(rows[picked]), names, head.needs_sequences, f"strategy {cfg.preset!r}", keep)
        out = head(batch)
        if out.logit is None:
            raise ValueError(f"strategy {cfg.preset!r} has no task head to train")
        loss = task_loss(head, out.logit, torch.from_numpy(labels[picked]), batch.mask)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(head.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        losses.append(float(loss.detach()))
        if progress is not None:
            progress(step, losses[-1])
    head.eval()
    tail = losses[-max(1, steps // 10):]
    return head, {"steps": steps, "lr": lr, "seconds": round(time.monotonic() - started, 2),
                  "final_loss": round(float(np.mean(tail)), 4), "config": cfg.record()}


@torch.no_grad()
def predict(head: FusionStrategy, cache, rows: np.ndarray, drop: str | None = None, batch_size: int = 256,
            modalities: Sequence[str] | None = None) -> np.ndarray:
    """Class probabilities [N, C] (classify) or match scores [N] of ``rows``; ``drop`` = a modality removed from
    every row (as a request without it)."""
    names = tuple(modalities or cache.modalities)
    out = []
    for start in range(0, len(rows), batch_size):
        chosen = rows[start : start + batch_size]
        keep = np.ones((len(chosen), len(names)), dtype=bool)
        if drop is not None:
            keep[:, names.index(drop)] = False
        batch = module_batch(cache.batch(chosen), names, head.needs_sequences, "fit", keep)
        logit = head(batch).logit
        out.append(torch.softmax(logit, -1).numpy() if head.task == "classify" else torch.sigmoid(logit).numpy())
    return np.concatenate(out)


def scores(task: str, probs: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """accuracy (and its standard error), macro-F1 for classify; a match score of 0.5 counts as "no match"."""
    predicted = probs.argmax(axis=1) if task == "classify" else (probs > 0.5).astype(np.int64)
    correct = predicted == labels
    n = max(1, len(labels))
    accuracy = float(correct.mean()) if len(labels) else 0.0
    out = {"accuracy": accuracy, "se": math.sqrt(max(accuracy * (1 - accuracy), 1.0 / n) / n), "rows": len(labels)}
    if task == "classify":
        f1 = []
        for c in range(probs.shape[1]):
            tp = int(np.sum((predicted == c) & (labels == c)))
            fp = int(np.sum((predicted == c) & (labels != c)))
            fn = int(np.sum((predicted != c) & (labels == c)))
            if tp + fp + fn:
                f1.append(2 * tp / (2 * tp + fp + fn))
        out["macro_f1"] = float(np.mean(f1)) if f1 else 0.0
    return out


def chance(task: str, labels: np.ndarray, classes: int) -> float:
    """The accuracy of always answering the most frequent label."""
    if not len(labels):
        return 0.0
    return float(np.bincount(labels, minlength=max(classes, 2)).max() / len(labels))


REFERENCE_DECAYS = (1e-3, 1e-4, 1e-5, 1e-6)  # L2 on the standardised features' weights, picked per modality
REFERENCE_ITERATIONS = 500


def pick_decay(x: np.ndarray, y: np.ndarray, task: str, outputs: int, seed: int = 0) -> float:
    """The REFERENCE_DECAYS value whose fit on 80% of the rows scores best on the other 20% (seeded)."""
    order = np.random.default_rng(seed).permutation(len(y))
    cut = int(0.8 * len(y))
    if cut < 4 or len(y) - cut < 4:
        return REFERENCE_DECAYS[0]
    fit_rows, held = order[:cut], order[cut:]
    best, best_acc = REFERENCE_DECAYS[0], -1.0
    for decay in REFERENCE_DECAYS:
        weight, bias = fit_linear(x[fit_rows], y[fit_rows], task, outputs, seed, decay)
        logit = torch.from_numpy(np.asarray(x[held], dtype=np.float32)) @ weight.T + bias
        guess = logit.argmax(1) if task == "classify" else (logit.squeeze(-1) > 0).long()
        acc = float((guess.numpy() == y[held]).mean())
        if acc > best_acc:
            best, best_acc = decay, acc
    return best


def fit_linear(x: np.ndarray, y: np.ndarray, task: str, outputs: int, seed: int = 0,
               decay: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """A linear classifier fitted to convergence (full-batch L-BFGS on standardised features, L2-regularised by
    ``decay``, or by the value :func:`pick_decay` picks), returned as (weight, bias) over the raw features."""
    if decay is None:
        decay = pick_decay(x, y, task, outputs, seed)
    torch.manual_seed(seed)
    x_t = torch.from_numpy(np.asarray(x, dtype=np.float32))
    mu, sigma = x_t.mean(0), x_t.std(0).clamp(min=1e-6)
    z = (x_t - mu) / sigma
    target = torch.from_numpy(np.asarray(y, dtype=np.int64))
    linear = torch.nn.Linear(x_t.shape[1], outputs)
    optimizer = torch.optim.LBFGS(linear.parameters(), max_iter=REFERENCE_ITERATIONS, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        logit = linear(z)
        if task == "classify":
            loss = F.cross_entropy(logit, target)
        else:
            loss = F.binary_cross_entropy_with_logits(logit.squeeze(-1), target.float())
        loss = loss + decay * linear.weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        weight = linear.weight / sigma
        bias = linear.bias - (linear.weight * (mu / sigma)).sum(1)
    return weight, bias


def fit_references(cfg: FitConfig, cache, rows: np.ndarray, labels: np.ndarray, classes: Sequence[str],
                   progress: Callable[[str], None] | None = None) -> dict[str, FusionStrategy]:
    """Per modality: a linear classifier on that modality's pooled embedding (a ``late`` strategy with one
    ``classifier`` over that modality alone, as served), fitted to convergence on the rows that have it."""
    pooled, present = cache.pooled()
    shapes = feature_shapes(cache)
    out = {}
    for i, modality in enumerate(cache.modalities):
        has = present[rows, i]
        if not has.any():
            continue
        if progress is not None:
            progress(modality)
        torch.manual_seed(cfg.seed)
        head = build("late", (modality,), shapes["embed_dim"], task=cfg.task,
                     classes=list(classes) if cfg.task == "classify" else None, **REFERENCE_OPTIONS)
        classifier = head.classifiers[0]
        weight, bias = fit_linear(pooled[rows[has], i], labels[has], cfg.task, classifier.out_features, cfg.seed)
        with torch.no_grad():
            classifier.weight.copy_(weight)
            classifier.bias.copy_(bias)
        out[modality] = head.eval()
    return out
