"""mmfuse eval --data without a server: class-wise metrics, chance-parameterised retention, the rows of a manifest,
the heads that match the data, the served configs of a classify head, and a data-mode report from known figures."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from mmfuse import shapes
from mmfuse.eval import corruptions as C
from mmfuse.eval import metrics as M
from mmfuse.eval import robustness as R
from mmfuse.eval.served_heads import Head

CLASSES = ("blue", "green", "red")


# -- metrics ------------------------------------------------------------------------------------------------------
def test_balanced_accuracy_over_classes_is_the_mean_recall_and_chance_for_any_constant_answer():
    labels = np.array([0, 0, 0, 0, 1, 1, 2, 2])  # unbalanced: plain accuracy would reward answering class 0
    for constant in range(3):
        counts = M.class_counts(np.full(8, constant), labels, CLASSES)
        assert M.class_balanced_accuracy(M.recall_by_class(counts)) == pytest.approx(1 / 3)
    predicted = np.array([0, 0, 1, 2, 1, 1, 2, 0])
    counts = M.class_counts(predicted, labels, CLASSES)
    assert counts == {"blue": {"rows": 4, "correct": 2}, "green": {"rows": 2, "correct": 2},
                      "red": {"rows": 2, "correct": 1}}
    recalls = M.recall_by_class(counts)
    assert recalls == {"blue": 0.5, "green": 1.0, "red": 0.5}
    assert M.class_balanced_accuracy(recalls) == pytest.approx(2 / 3)
    assert M.chance_of(CLASSES) == pytest.approx(1 / 3) and M.chance_of(("0", "1")) == 0.5
    se = M.class_balanced_se(counts)
    expected = math.sqrt(sum((1 / 3) ** 2 * r * (1 - r) / n for r, n in ((3 / 6, 4), (3 / 4, 2), (2 / 4, 2))))
    assert se == pytest.approx(expected)
    perfect = M.class_counts(labels, labels, CLASSES)
    assert M.class_balanced_accuracy(M.recall_by_class(perfect)) == 1.0 and M.class_balanced_se(perfect) > 0


def test_macro_f1_by_hand():
    labels = np.array([0, 0, 0, 0, 1, 1, 2, 2])
    predicted = np.array([0, 0, 1, 2, 1, 1, 2, 0])
    # blue: tp 2, fp 1, fn 2 -> 4/7; green: tp 2, fp 1, fn 0 -> 4/5; red: tp 1, fp 1, fn 1 -> 1/2
    assert M.macro_f1(predicted, labels, 3) == pytest.approx((4 / 7 + 4 / 5 + 1 / 2) / 3)
    assert M.macro_f1(labels, labels, 3) == 1.0
    assert M.macro_f1(np.array([], dtype=int), np.array([], dtype=int), 3) == 0.0


def test_predictions_from_probs_and_scores():
    uniform = np.full((2, 3), 1 / 3)
    assert M.predicted_classes(uniform).tolist() == [0, 0]  # a head that cannot decide: a constant answer
    assert M.predicted_classes(np.array([[0.1, 0.7, 0.2], [0.2, 0.2, 0.6]])).tolist() == [1, 2]
    assert M.predicted_classes(np.array([0.2, 0.5, 0.51])).tolist() == [0, 0, 1]  # match: 0.5 is "no match"


def test_retention_and_flag_take_the_chance_level():
    assert M.retention(0.7, 0.9, 0.02) == pytest.approx(0.5)  # the shapes default: chance 0.5
    assert M.retention(0.5, 0.75, 0.02, chance=0.25) == pytest.approx(0.5)
    assert M.retention(0.25, 0.75, 0.02, chance=0.25) == pytest.approx(0.0)
    assert M.retention(0.4, 0.52, 0.02) is None  # against chance 0.5 the reference is not above chance ...
    assert M.retention(0.4, 0.52, 0.02, chance=0.25) == pytest.approx(0.15 / 0.27)  # ... against 1/4 it is
    assert M.retention(0.5, 0.29, 0.03, chance=0.25) is None  # within two standard errors of chance
    assert M.catastrophic(0.2, 0.03, 0.6, 0.03) and not M.catastrophic(0.58, 0.03, 0.6, 0.03)


# -- rows of a manifest -------------------------------------------------------------------------------------------
def write_manifest(folder: Path, rows: int = 12, seed: int = 3) -> Path:
    """Shapes images; the label is the colour of the first object (in the text too); a few bad rows."""
    import random

    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    lines = []
    for i in range(rows):
        colour = CLASSES[i % 3]
        other = rng.choice(["yellow", "purple"])
        obj = shapes.Obj(colour, "circle", 14 + 2 * (i % 5), 16, 10)
        obj2 = shapes.Obj(other, "square", 44, 44, 10)
        (folder / f"{i}.png").write_bytes(shapes.png_bytes(shapes.render([obj, obj2])))
        row = {"image": f"{i}.png", "text": f"a {colour} circle", "label": colour}
        if i == 4:
            row.pop("image")  # text only
        lines.append(json.dumps(row))
    lines.insert(2, "{not json")
    lines.insert(5, json.dumps({"image": "nowhere.png", "text": "x", "label": "red"}))
    lines.insert(7, json.dumps({"image": "0.png", "text": "a pink circle", "label": "pink"}))
    path = folder / "test.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def manifest_path(tmp_path_factory) -> Path:
    return write_manifest(tmp_path_factory.mktemp("data"))


def test_rows_of_a_manifest_with_unusable_rows_reported(manifest_path):
    from mmfuse.datasets import read_manifest

    manifest = read_manifest(manifest_path, "classify", classes=CLASSES)
    rows = R.DataRows.from_manifest(manifest)
    assert len(rows) == 12 and rows.classes == CLASSES
    assert [line for line, _ in manifest.skipped] == [3, 6, 8]
    assert "unknown label" in dict(manifest.skipped)[8]
    assert rows.images[4] == b"" and rows.texts[4] == "a green circle"  # a text-only row is kept
    assert rows.labels == [i % 3 for i in range(12)]
    assert rows.images[0].startswith(b"\x89PNG") and rows.example_row() == 0
    subset = R.DataRows.from_manifest(manifest, limit=6, seed=1)
    assert len(subset) == 6 and sorted(subset.labels) == [0, 0, 1, 1, 2, 2]  # classes in turn
    assert subset.lines == sorted(subset.lines)
    assert R.DataRows.from_manifest(manifest, limit=6, seed=1).lines == subset.lines  # seeded
    # a row without an image stays without one under every image corruption
    images, _ = C.apply("noise", 1.0, rows.images, rows.texts, 0)
    assert images[4] == b"" and images[0] != rows.images[0]


def test_select_rows_takes_classes_in_turn():
    labels = [0] * 10 + [1] * 2 + [2] * 3
    picked = R.select_rows(labels, 6, 0)
    assert sorted(labels[i] for i in picked) == [0, 0, 1, 1, 2, 2]
    assert R.select_rows(labels, None, 0) == list(range(15)) and R.select_rows(labels, 99, 0) == list(range(15))


# -- which heads are evaluated --------------------------------------------------------------------------------------
def _head(name: str, strategy: str, task: str, classes=()) -> Head:
    description = {"strategy": strategy, "hparams": {}}
    if task == "classify":
        description.update(task="classify", classes=list(classes))
    return Head(name, strategy, Path(f"/r/fusion/{name}"), f"fusion/{name}", description)


def test_heads_of_the_data_task_and_classes():
    from mmfuse.eval.runner import _data_heads

    heads = [_head("late", "late", "match"), _head("early", "early", "classify", CLASSES),
             _head("attention", "attention", "classify", ("a", "b")), _head("late-c", "late", "classify", CLASSES)]
    assert heads[1].task == "classify" and heads[0].task == "match" and heads[0].classes == ()
    classes, chosen, skipped = _data_heads(heads, "classify", ())
    assert classes == CLASSES and [h.name for h in chosen] == ["early", "late-c"]  # the newest head's classes
    assert "a match head" in skipped["late"] and "differ" in skipped["attention"]
    classes, chosen, _ = _data_heads(heads, "classify", ("a", "b"))  # the served head's classes win
    assert classes == ("a", "b") and [h.name for h in chosen] == ["attention"]
    classes, chosen, skipped = _data_heads(heads, "match", ())
    assert classes is None and [h.name for h in chosen] == ["late"] and set(skipped) == {"early", "attention", "late-c"}


def test_a_classify_head_is_served_with_probs_and_label_and_the_match_config_comes_back():
    from mmfuse.eval.served_heads import task_ensemble
    from mmfuse.repository import load_config
    from tests.paths import SHIPPED_REPOSITORY

    ensemble = load_config(SHIPPED_REPOSITORY, "fuse_image_text")
    fusion = load_config(SHIPPED_REPOSITORY, "fusion")
    classify = task_ensemble(ensemble, fusion, "classify")
    names = [o.name for o in classify.output]
    assert "PROBS" in names and "LABEL" in names and "SCORE" not in names
    step = next(s for s in classify.ensemble_scheduling.step if s.model_name == "fusion")
    assert step.output_map["PROBS"] == "PROBS" and "SCORE" not in step.output_map
    assert task_ensemble(classify, fusion, "match") == ensemble


# -- figures and the report, without a server -------------------------------------------------------------------------
class FakeCache:
    """EmbeddingCache.get without a server: a fixed embedding per input, invalid where the input is empty."""

    def __init__(self, dim: int = 8):
        self.dim = dim

    def get(self, modality: str, values):
        out = []
        for v in values:
            raw = v.encode() if isinstance(v, str) else v
            seed = int.from_bytes(__import__("hashlib").sha256(raw + modality.encode()).digest()[:4], "little")
            out.append(np.random.default_rng(seed).standard_normal(self.dim).astype(np.float32))
        return np.stack(out), np.asarray([bool(v) for v in values])


def test_reference_heads_give_the_constant_answer_without_their_modality(tmp_path):
    import torch

    from mmfuse.serving.strategies import build, save_head

    for m in ("image", "text"):
        torch.manual_seed(0)
        head = build("late", (m.upper(),), 8, task="classify", classes=list(CLASSES), gate="fixed", head="classifier",
                     normalize=False)
        save_head(head.eval(), tmp_path / "references" / m)
    assert R.has_references(tmp_path)
    refs = R.ReferenceHeads(tmp_path)
    cond = R.Condition("dropout_image", 1.0, [b"", b"x"], ["a red circle", ""])
    out = refs.outputs(FakeCache(), cond)
    assert out["image"].shape == (2, 3) and out["text"].shape == (2, 3)
    np.testing.assert_allclose(out["image"][0], 1 / 3)  # image missing
    np.testing.assert_allclose(out["text"][1], 1 / 3)  # text missing
    np.testing.assert_allclose(out["image"].sum(axis=1), 1.0, atol=1e-6)
    assert not np.allclose(out["text"][0], 1 / 3)


def _probs(labels: list[int], right: np.ndarray) -> np.ndarray:
    """PROBS that put 0.8 on the label where ``right``, else on the next class."""
    out = np.full((len(labels), 3), 0.1, dtype=np.float32)
    for i, (y, ok) in enumerate(zip(labels, right)):
        out[i, y if ok else (y + 1) % 3] = 0.8
    return out


def test_data_mode_figures_retention_and_report(manifest_path, tmp_path):
    from PIL import Image

    from mmfuse.datasets import read_manifest
    from mmfuse.eval.report import write_report
    from mmfuse.eval.runner import EvalConfig, _data_rows

    cfg = EvalConfig(out=tmp_path, data=manifest_path, max_rows=0)
    rows, data = _data_rows(cfg, "classify", CLASSES)
    assert data["rows_used"] == 12 and data["rows_skipped"] == 3 and [s["line"] for s in data["skipped"]] == [3, 6, 8]
    assert len(data["sha256"]) == 64 and data["classes"] == list(CLASSES)
    assert data["rows_per_class"] == {"blue": 4, "green": 4, "red": 4}
    assert rows.labels == R.DataRows.from_manifest(read_manifest(manifest_path, "classify", classes=CLASSES)).labels

    names = ["noise", "dropout_image", "dropout_text"]
    levels = [0.0, 0.5, 1.0]
    keys = ["clean"] + [f"{n}@{p:.1f}" for n in names for p in levels[1:]]
    n = len(rows)
    rng = np.random.default_rng(0)
    all_right = np.ones(n, bool)
    fused = {k: _probs(rows.labels, rng.random(n) < 0.7) for k in keys}
    fused["clean"] = _probs(rows.labels, all_right)
    fused["dropout_image@1.0"] = _probs(rows.labels, np.arange(n) % 2 == 0)  # half right
    late = {k: _probs(rows.labels, rng.random(n) < 0.6) for k in keys}
    text_ref = {k: _probs(rows.labels, np.arange(n) % 4 != 0) for k in keys}  # 3/4 right everywhere
    image_ref = {k: np.full((n, 3), 1 / 3, dtype=np.float32) for k in keys}  # constant: chance
    strategies = {"attention": R.figures(fused, rows, names, levels), "late": R.figures(late, rows, names, levels)}
    single = {"image": R.figures(image_ref, rows, names, levels), "text": R.figures(text_ref, rows, names, levels)}
    clean = strategies["attention"]["clean"]
    assert clean["balanced"] == 1.0 and clean["macro_f1"] == 1.0 and set(clean["by_class"]) == set(CLASSES)
    assert single["image"]["clean"]["balanced"] == pytest.approx(1 / 3)  # a constant answer: chance
    chance = M.chance_of(rows.classes)
    R.compare(strategies, None, "late", names, levels, chance=chance, singles={"attention": single},
              retention_reference="remaining")
    fig = strategies["attention"]
    absent = fig["retention"]["image_absent"]
    acc_half = fig["curves"]["dropout_image"]["balanced"][2]
    ref = single["text"]["conditions"]["dropout_image@1.0"]["balanced"]
    assert absent["reference_accuracy"] == pytest.approx(ref)
    assert absent["retention"] == pytest.approx((acc_half - chance) / (ref - chance))
    assert fig["retention"]["text_absent"]["retention"] is None  # the image reference is at chance
    assert fig["curves"]["noise"]["effective_robustness"][0] == 0.0
    assert strategies["late"]["retention"] == {} and strategies["late"]["flags"] == []  # no references given
    curve = fig["curves"]["noise"]
    assert set(curve["by_class"]) == set(CLASSES) and curve["relative_robustness"] == pytest.approx(
        np.trapz(curve["balanced"], levels))

    for f in [*strategies.values(), *single.values()]:
        f.pop("conditions")
    fig["output"] = "PROBS"
    strategies["late"]["output"] = "PROBS"
    report = {
        "created_utc": "now", "seconds": 1.0, "command": "mmfuse eval --data x", "machine": {"cpus": 2},
        "server": {"embedded": True, "url": "127.0.0.1:1", "repository": "repo", "served_fusion": "attention"},
        "data": data,
        "robustness": {"mode": "data", "task": "t.", "task_name": "classify", "classes": list(CLASSES),
                       "chance": chance, "levels": levels, "baseline": "late", "baseline_note": None,
                       "not_evaluated": {"old": "a match head; the data is classify"},
                       "dataset": {"rows": n, "seed": 0, "path": data["path"], "sha256": data["sha256"]},
                       "corruptions": {k: {"modality": C.CORRUPTIONS[k].modality, "label": C.CORRUPTIONS[k].label}
                                       for k in names},
                       "heads": [{"name": s, "source": f"fusion/{i + 2}"} for i, s in enumerate(strategies)],
                       "strategies": strategies,
                       "single_modality": {"references": {"fusion/2": single}, "of_strategy": {"attention": "fusion/2"}}},
    }
    write_report(report, tmp_path)
    md = (tmp_path / "report.md").read_text()
    assert data["sha256"] in md and "**12 used**" in md and "**3 skipped**" in md
    assert "| 8 | unknown label" in md and "old: a match head" in md
    assert "| attention | fusion/2 | PROBS | 100.0% | 1.000 |" in md
    assert "| attention | 100.0% | 100.0% | 100.0% |" in md  # recall per class
    assert f"| {absent['retention']:.2f} |" in md and "n/a" in md
    assert json.loads((tmp_path / "report.json").read_text())["robustness"]["classes"] == list(CLASSES)
    for png in ("robustness", "auc", "effective_robustness", "attention_kinds", "late_kinds", "corruptions"):
        with Image.open(tmp_path / f"{png}.png") as image:
            assert image.width > 400, png
