"""Heads fitted on cached features (mmfuse.fit, mmfuse.train_data, mmfuse.comparison), on the shipped repository's
encoders and a small generated classify dataset: real features, real strategies, no server."""
from __future__ import annotations

import json

import numpy as np
import pytest

from mmfuse import fit, train_data
from mmfuse.datasets import Example, Manifest
from mmfuse.synthetic import write_dataset
from tests.unit.conftest import MODEL_REPOSITORY


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fit-data")
    write_dataset("classify", folder, {"train": 320, "val": 80, "test": 80}, seed=5)
    cache = tmp_path_factory.mktemp("fit-cache")
    return train_data.prepare(MODEL_REPOSITORY, folder / "train.jsonl", folder / "val.jsonl", "classify", cache)


def test_linear_fit_reaches_a_separable_optimum():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 6)) * np.array([1e-4, 1e-3, 1, 1, 1, 1]) + 5.0  # ill-conditioned, off-centre
    y = (x[:, 0] > 5.0).astype(np.int64)  # decided by the smallest-variance feature
    weight, bias = fit.fit_linear(x, y, "classify", 2)
    accuracy = float((((x @ weight.numpy().T) + bias.numpy()).argmax(1) == y).mean())
    assert accuracy > 0.97


def test_references_are_informative_and_below_the_fused_head(prepared):
    cfg = fit.FitConfig(preset="early", epochs=10)
    head, record = fit.fit_head(cfg, prepared.train.cache, prepared.train.rows, prepared.train.labels, prepared.classes)
    assert head.whiten and record["lr"] == fit.DEFAULT_LR["early"] and np.isfinite(record["final_loss"])
    refs = fit.fit_references(cfg, prepared.train.cache, prepared.train.rows, prepared.train.labels, prepared.classes)
    assert set(refs) == {"IMAGE", "TEXT"}
    chance = fit.chance("classify", prepared.val.labels, len(prepared.classes))
    fused = train_data.evaluate(head, prepared.val, "classify", prepared.classes)
    for modality, ref in refs.items():
        alone = train_data.evaluate(ref, prepared.val, "classify", prepared.classes, (modality,))["clean"]
        # each modality alone carries half of the label: better than chance, worse than both
        assert chance + 0.1 < alone["accuracy"] < fused["clean"]["accuracy"], modality
    assert fused["no_image"]["accuracy"] < fused["clean"]["accuracy"]


def test_without_val_a_seeded_tenth_is_held_out(tmp_path):
    examples = [Example(i + 1, None, f"t{i}", "a" if i % 2 else "b", None) for i in range(120)]
    manifest = Manifest(tmp_path / "m.jsonl", "classify", examples, ("a", "b"), [])
    held = train_data._held_out(manifest, seed=3)
    assert len(held) == 12 and held == train_data._held_out(manifest, seed=3)
    assert held != train_data._held_out(manifest, seed=4)
    marked = [Example(i + 1, None, "t", "a", "val" if i < 5 else None) for i in range(120)]
    assert train_data._held_out(Manifest(tmp_path / "m.jsonl", "classify", marked, ("a",), []), 0) == \
        {id(e) for e in marked[:5]}
    small = Manifest(tmp_path / "m.jsonl", "classify", examples[:20], ("a", "b"), [])
    assert train_data._held_out(small, 0) == set()


def test_comparison_reports_retention_and_a_table(prepared):
    from mmfuse.comparison import compare, table

    cfg = fit.FitConfig(epochs=4)
    report = compare(prepared, prepared.val, ["late", "early"], 0.3, cfg, say=lambda _: None)
    assert [(r["strategy"], r["modality_dropout"]) for r in report["results"]] == \
        [("late", 0.0), ("late", 0.3), ("early", 0.0), ("early", 0.3)]
    for r in report["results"]:
        assert set(r["retention"]) == {"no_image", "no_text"}
        assert any(v is not None for v in r["retention"].values())  # a number on the classify task, not n/a
        # nothing present: uniform PROBS, whose argmax is the first class
        assert r["dropout_curve"]["1.0"] == pytest.approx(float(np.mean(prepared.val.labels == 0)))
        assert r["fusion_ms_per_row"] > 0 and r["head"]["parameters"] > 0
    text = table(report)
    assert text.count("\n| late |") == 2 and "retention no image" in text
    json.dumps(report)  # what --out writes
