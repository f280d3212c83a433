"""The robustness figures, from per-row scores (numpy only; no server, no torch).

Task: the shapes benchmark's match SCORE (mmfuse/shapes.py). A row is predicted a match when its score
is > 0.5; 0.5 exactly (what the heads answer when they cannot decide, e.g. a modality is missing) is
predicted "no match". Accuracy is given per kind (positive, swapped, attribute) and as **balanced
accuracy**: 0.5 x positives + 0.5 x the mean over the negative kinds, whose chance level is 0.5
(``CHANCE``) whatever the predictor (always "match", always "no match", coin flips).

* relative robustness: the area under the balanced-accuracy curve over p in [0, 1] (trapezoid rule);
* effective robustness: the curve minus the late-fusion curve shifted to the same clean accuracy,
  ``acc(p) - (late(p) - late(0) + acc(0))``, and its mean over the levels;
* retention with a modality absent: ``(acc - CHANCE) / (best single-modality acc - CHANCE)``,
  undefined (None) when no single-modality model is above chance by 2 standard errors;
* catastrophic degradation: a flag where a strategy's balanced accuracy is below the best
  single-modality model's under the same condition by more than 1.96 standard errors of the
  difference (``FLAG_Z``), so that two models both at chance are not flagged for sampling noise.

On a dataset of the user's own (``mmfuse eval --data``) the groups are the classes: a row is predicted the
class of highest probability (PROBS argmax, ties to the first class: a head that cannot decide answers
uniform PROBS, i.e. a constant answer), or, for match data, class 1 when SCORE > 0.5. Accuracy is given
per class (recall) and as **balanced accuracy**, the mean per-class recall, whose chance level is
``1 / C`` for any constant answer (0.5 for match); ``macro_f1`` beside it. The chance level is a parameter
of ``retention`` (default ``CHANCE``, the shapes benchmark's).
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

CHANCE = 0.5
FLAG_Z = 1.96
POSITIVE = "positive"


def predictions(scores: np.ndarray) -> np.ndarray:
    return np.asarray(scores, dtype=np.float64) > 0.5


def kind_counts(scores: np.ndarray, labels: Sequence[int], kinds: Sequence[str]) -> dict[str, dict[str, int]]:
    """Per kind: rows and correct predictions."""
    correct = predictions(scores) == np.asarray(labels, dtype=bool)
    out: dict[str, dict[str, int]] = {}
    for kind in dict.fromkeys(kinds):  # first-seen order
        rows = np.asarray([k == kind for k in kinds])
        out[kind] = {"rows": int(rows.sum()), "correct": int(correct[rows].sum())}
    return out


def accuracy_by_kind(counts: Mapping[str, Mapping[str, int]]) -> dict[str, float]:
    return {kind: c["correct"] / c["rows"] for kind, c in counts.items() if c["rows"]}


def balanced_accuracy(by_kind: Mapping[str, float]) -> float:
    negatives = [v for k, v in by_kind.items() if k != POSITIVE]
    return 0.5 * by_kind[POSITIVE] + 0.5 * float(np.mean(negatives))


def balanced_se(by_kind: Mapping[str, float], counts: Mapping[str, Mapping[str, int]]) -> float:
    """Binomial standard error of the balanced accuracy (kinds independent), each kind's rate taken as
    (correct + 1) / (rows + 2) so that a kind at 0 % or 100 % on a few rows is not given zero variance."""
    negatives = [k for k in by_kind if k != POSITIVE]
    weights = {POSITIVE: 0.5, **{k: 0.5 / len(negatives) for k in negatives}}
    var = 0.0
    for k in by_kind:
        rows = counts[k]["rows"]
        rate = (counts[k]["correct"] + 1) / (rows + 2)
        var += weights[k] ** 2 * rate * (1 - rate) / max(1, rows)
    return math.sqrt(var)


# -- classes (a dataset of the user's own) ------------------------------------------------------------------------
def chance_of(classes: Sequence[str]) -> float:
    """Balanced accuracy of any constant answer: 1 / C (0.5 for match's two classes)."""
    return 1.0 / max(1, len(classes))


def predicted_classes(outputs: np.ndarray) -> np.ndarray:
    """Class indices from PROBS [N, C] (argmax, ties to the first class) or from a match SCORE [N] (1 when > 0.5)."""
    outputs = np.asarray(outputs, dtype=np.float64)
    if outputs.ndim == 2 and outputs.shape[1] > 1:
        return outputs.argmax(axis=1).astype(np.int64)
    return predictions(outputs.reshape(-1)).astype(np.int64)


def class_counts(predicted: np.ndarray, labels: Sequence[int], classes: Sequence[str]) -> dict[str, dict[str, int]]:
    """Per class (in ``classes`` order): rows of that label and how many of them were predicted right."""
    predicted, labels = np.asarray(predicted), np.asarray(labels)
    return {c: {"rows": int(np.sum(labels == i)), "correct": int(np.sum((labels == i) & (predicted == i)))}
            for i, c in enumerate(classes)}


def recall_by_class(counts: Mapping[str, Mapping[str, int]]) -> dict[str, float]:
    """Per-class recall, for the classes that have rows."""
    return accuracy_by_kind(counts)


def class_balanced_accuracy(recalls: Mapping[str, float]) -> float:
    """The mean per-class recall (chance: 1 / C for any constant answer)."""
    return float(np.mean(list(recalls.values()))) if recalls else 0.0


def class_balanced_se(counts: Mapping[str, Mapping[str, int]]) -> float:
    """Binomial standard error of the mean per-class recall (classes independent, equal weights), each rate taken
    as (correct + 1) / (rows + 2) as in ``balanced_se``."""
    present = [c for c in counts.values() if c["rows"]]
    if not present:
        return 0.0
    w = 1.0 / len(present)
    var = sum(w * w * ((c["correct"] + 1) / (c["rows"] + 2)) * (1 - (c["correct"] + 1) / (c["rows"] + 2)) / c["rows"]
              for c in present)
    return math.sqrt(var)


def macro_f1(predicted: np.ndarray, labels: Sequence[int], classes: int) -> float:
    """Mean F1 over the classes that occur (as label or prediction); 0 when none."""
    predicted, labels = np.asarray(predicted), np.asarray(labels)
    f1 = []
    for c in range(classes):
        tp = int(np.sum((predicted == c) & (labels == c)))
        fp = int(np.sum((predicted == c) & (labels != c)))
        fn = int(np.sum((predicted != c) & (labels == c)))
        if tp + fp + fn:
            f1.append(2 * tp / (2 * tp + fp + fn))
    return float(np.mean(f1)) if f1 else 0.0


def trapezoid(x: Sequence[float], y: Sequence[float]) -> float:
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    return float(np.sum((x[1:] - x[:-1]) * (y[1:] + y[:-1]) / 2.0))


def relative_robustness(levels: Sequence[float], curve: Sequence[float]) -> float:
    """Area under the curve over [levels[0], levels[-1]] (1.0 = perfect at every level)."""
    return trapezoid(levels, curve) / (levels[-1] - levels[0])


def effective_robustness(curve: Sequence[float], late: Sequence[float]) -> list[float]:
    curve, late = np.asarray(curve, dtype=np.float64), np.asarray(late, dtype=np.float64)
    return (curve - (late - late[0] + curve[0])).tolist()


def retention(absent_acc: float, best_single: float, best_single_se: float, chance: float = CHANCE) -> float | None:
    """``(absent_acc - chance) / (best_single - chance)``; None when the reference is not above chance by 2 SE."""
    if best_single - chance <= 2 * best_single_se or best_single <= chance:
        return None
    return (absent_acc - chance) / (best_single - chance)


def catastrophic(acc: float, se: float, single: float, single_se: float) -> bool:
    return acc < single - FLAG_Z * math.sqrt(se * se + single_se * single_se)


def summarise(levels: Sequence[float], curves: Mapping[str, Sequence[float]]) -> dict[str, float]:
    return {name: relative_robustness(levels, c) for name, c in curves.items()}


# -- single-modality models: a logistic regression on one modality's served embedding ------------------
def fit_logistic(x: np.ndarray, y: np.ndarray, l2: float = 1e-2, iterations: int = 50,
                 sample_weight: np.ndarray | None = None) -> np.ndarray:
    """Weights [D+1] (bias last) of an L2-regularised logistic regression, by Newton's method."""
    x = np.hstack([np.asarray(x, dtype=np.float64), np.ones((len(x), 1))])
    y = np.asarray(y, dtype=np.float64)
    w_rows = np.ones(len(y)) if sample_weight is None else np.asarray(sample_weight, dtype=np.float64)
    w = np.zeros(x.shape[1])
    reg = l2 * np.eye(x.shape[1])
    reg[-1, -1] = 0.0
    for _ in range(iterations):
        p = 1.0 / (1.0 + np.exp(-(x @ w)))
        grad = x.T @ (w_rows * (p - y)) + reg @ w
        hess = (x * (w_rows * p * (1 - p))[:, None]).T @ x + reg
        step = np.linalg.solve(hess + 1e-9 * np.eye(len(w)), grad)
        w -= step
        if np.max(np.abs(step)) < 1e-8:
            break
    return w


def logistic_scores(w: np.ndarray, x: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Scores of the rows; a row whose input is not valid gets 0.5 (cannot decide)."""
    z = np.asarray(x, dtype=np.float64) @ w[:-1] + w[-1]
    return np.where(np.asarray(valid, dtype=bool), 1.0 / (1.0 + np.exp(-z)), 0.5)


def balanced_weights(labels: Sequence[int], kinds: Sequence[str]) -> np.ndarray:
    """Row weights that give positives and negatives equal mass and the negative kinds equal shares."""
    kinds = list(kinds)
    negatives = sorted({k for k in kinds if k != POSITIVE})
    mass = {POSITIVE: 0.5, **{k: 0.5 / max(1, len(negatives)) for k in negatives}}
    counts = {k: kinds.count(k) for k in set(kinds)}
    return np.asarray([mass[k] * len(kinds) / counts[k] for k in kinds])


def levels_of(conditions: Iterable[tuple[str, float]]) -> list[float]:
    return sorted({level for _, level in conditions})
