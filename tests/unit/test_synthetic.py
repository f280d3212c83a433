"""mmfuse make-dataset / mmfuse.synthetic: files, manifests read back, determinism, the classify design."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from mmfuse import shapes, synthetic
from mmfuse.cli import main
from mmfuse.datasets import read_manifest

COUNTS = {"train": 16, "val": 8, "test": 8}


def _make(tmp_path: Path, task: str, name: str = "data", seed: int = 0, counts=COUNTS) -> Path:
    out = tmp_path / name
    argv = ["make-dataset", task, "--out", str(out), "--seed", str(seed)]
    for split, n in counts.items():
        argv += [f"--{split}", str(n)]
    assert main(argv) == 0
    return out


def _files(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("task", synthetic.TASKS)
def test_the_files_are_written_and_read_back_without_skipped_rows(tmp_path, task, capsys):
    out = _make(tmp_path, task)
    printed = capsys.readouterr().out.splitlines()
    assert len(printed) == 4 and all(line.startswith("wrote ") for line in printed)
    assert set(_files(out)) == synthetic.planned_files(COUNTS)
    info = json.loads((out / "dataset.json").read_text())
    assert info["task"] == task and info["counts"] == COUNTS and info["seed"] == 0
    for split, n in COUNTS.items():
        lines = (out / f"{split}.jsonl").read_text().splitlines()
        assert [set(json.loads(line)) for line in lines] == [set(synthetic.MANIFEST_FIELDS)] * n
        manifest = read_manifest(out / f"{split}.jsonl", task)
        assert manifest.skipped == [] and len(manifest.examples) == n
        assert {e.split for e in manifest.examples} == {split}
        assert all(e.image.parent == out / "images" and e.text for e in manifest.examples)
        if task == "classify":
            assert set(manifest.classes) <= set(info["classes"]) == set(synthetic.CLASSES)
            counts = Counter(e.label for e in manifest.examples)
            assert max(counts.values()) - min(counts.values()) <= 1
            assert len(counts) == min(n, len(synthetic.CLASSES))
        else:
            assert info["classes"] == ["0", "1"] and {e.label for e in manifest.examples} <= {0, 1}
    if task == "classify":
        assert {v["part"] for v in info["modalities"].values()} == {"shape", "colour", "relation"}


def test_match_rows_are_the_shapes_benchmark():
    rows = synthetic.generate_match(40, 3)
    expected = shapes.generate(40, 3)
    assert [(r.text, r.label) for r in rows] == [(e.caption, e.label) for e in expected]
    assert all(np.array_equal(r.image, e.image) for r, e in zip(rows, expected))
    assert 0 < sum(r.label for r in rows) < 40


@pytest.mark.parametrize("task", synthetic.TASKS)
def test_the_same_seed_gives_the_same_bytes(tmp_path, task):
    a, b = _make(tmp_path, task, "a"), _make(tmp_path, task, "b")
    assert _files(a) == _files(b)
    c = _make(tmp_path, task, "c", seed=1)
    assert (c / "train.jsonl").read_bytes() != (a / "train.jsonl").read_bytes()


def test_classes_are_balanced_and_named_by_their_parts():
    assert len(synthetic.CLASSES) == 8 == len(set(synthetic.CLASSES))
    assert list(synthetic.CLASSES) == sorted(synthetic.CLASSES)  # read_manifest's order
    rows = synthetic.generate_classify(80, 0)
    assert set(Counter(r.label for r in rows).values()) == {10}
    for r in rows:
        assert r.label == synthetic.class_name(r.truth["shape"], r.truth["colour"], r.truth["relation"])


def test_the_text_never_names_the_target_shape_and_only_the_target_is_red_or_blue():
    for seed in range(30):
        row = synthetic.generate_classify(1, seed)[0]
        t = row.truth
        article, colour, noun, *relation_and_reference = row.text.split()
        assert (article, colour) == ("a", t["colour"]) and noun in synthetic.FILLER_NOUNS
        assert " ".join(relation_and_reference[:-3]) == synthetic.RELATIONS[t["relation"]]
        assert t["reference"][0] not in synthetic.TARGET_COLOURS  # the reference is never mistaken for the target
        # the only red/blue pixels are the target's, and they show its shape
        drawn = np.all(row.image == shapes.COLOURS[t["colour"]], axis=-1)
        assert np.array_equal(drawn, shapes.object_mask(t["target"]))
        assert t["distractor"].colour not in synthetic.TARGET_COLOURS


@pytest.mark.parametrize("seed", range(10))
def test_each_part_of_the_label_reaches_only_its_modalities(seed):
    def row(label):
        return synthetic.make_classify_row(np.random.default_rng(seed), label)

    base = row("circle-red-left")
    other_shape, other_relation, other_colour = row("triangle-red-left"), row("circle-red-above"), row("circle-blue-left")
    # image only: changing the shape, all else equal, leaves the text byte-identical
    assert other_shape.text == base.text and not np.array_equal(other_shape.image, base.image)
    # text only: changing the relation leaves the image identical
    assert np.array_equal(other_relation.image, base.image) and other_relation.text != base.text
    # both
    assert other_colour.text != base.text and not np.array_equal(other_colour.image, base.image)


def test_rerunning_into_the_same_folder_is_allowed_and_identical(tmp_path):
    out = _make(tmp_path, "classify")
    before = _files(out)
    assert main(["make-dataset", "classify", "--out", str(out), "--train", "16", "--val", "8", "--test", "8"]) == 0
    assert _files(out) == before


def test_bad_requests_are_refused_with_exit_2(tmp_path, capsys):
    foreign = tmp_path / "busy"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    assert main(["make-dataset", "classify", "--out", str(foreign), "--train", "4"]) == 2
    assert "notes.txt" in capsys.readouterr().err
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]  # nothing written

    out = _make(tmp_path, "match", counts={"train": 4, "val": 2, "test": 2})
    # a smaller request would leave stale images that no manifest lists
    assert main(["make-dataset", "match", "--out", str(out), "--train", "2", "--val", "2", "--test", "2"]) == 2
    assert "train-00003.png" in capsys.readouterr().err

    a_file = tmp_path / "file"
    a_file.write_text("x")
    assert main(["make-dataset", "match", "--out", str(a_file)]) == 2
    for flag in ("--train", "--val", "--test"):
        assert main(["make-dataset", "classify", "--out", str(tmp_path / "new"), flag, "0"]) == 2
        assert f"{flag} must be a positive" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()
    with pytest.raises(SystemExit) as error:
        main(["make-dataset", "regress", "--out", str(tmp_path / "new")])
    assert error.value.code == 2
    with pytest.raises(ValueError, match="unknown task"):
        synthetic.write_dataset("regress", tmp_path / "new", {"train": 1})
