"""Manifests of the user's own data: JSONL and CSV, relative paths, bad rows counted with their lines."""
from __future__ import annotations

import json

import pytest
from PIL import Image

from mmfuse.datasets import DatasetError, read_manifest


@pytest.fixture
def folder(tmp_path):
    (tmp_path / "img").mkdir()
    Image.new("RGB", (8, 8), (255, 0, 0)).save(tmp_path / "img" / "red.png")
    Image.new("RGB", (8, 8), (0, 0, 255)).save(tmp_path / "img" / "blue.jpg")
    (tmp_path / "img" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    return tmp_path


def write_jsonl(path, rows):
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


def test_jsonl_rows_good_and_bad_with_line_numbers(folder):
    manifest = write_jsonl(folder / "train.jsonl", [
        {"image": "img/red.png", "text": "a red square", "label": "red", "split": "train"},
        {"image": str(folder / "img" / "blue.jpg"), "text": None, "label": "blue"},  # absolute, text missing
        {"text": "only text", "label": "red"},  # image absent
        "",  # blank lines are not rows
        "{not json",
        {"image": "img/nowhere.png", "text": "x", "label": "red"},
        {"image": "img/broken.png", "text": "x", "label": "red"},
        {"image": None, "text": "", "label": "red"},
        {"image": "img/red.png", "text": "no label"},
        {"image": "img/red.png", "text": "x", "label": "red", "colour": "red"},
    ])
    m = read_manifest(manifest, "classify")
    assert [e.line for e in m.examples] == [1, 2, 3]
    assert m.examples[0].image == folder / "img" / "red.png" and m.examples[0].split == "train"
    assert m.examples[1].text is None and m.examples[2].image is None
    assert m.classes == ("blue", "red")
    reasons = dict(m.skipped)
    assert set(reasons) == {5, 6, 7, 8, 9, 10}
    assert reasons[5].startswith("malformed") and reasons[6].startswith("missing file")
    assert reasons[7].startswith("undecodable image") and reasons[8].startswith("no modality")
    assert reasons[9].startswith("bad label") and "unknown field" in reasons[10]
    report = m.report()
    assert report.splitlines()[0].endswith("3 usable rows, 6 skipped (2 malformed, 1 missing file, "
                                           "1 undecodable image, 1 no modality, 1 bad label)")
    assert "line 6: missing file" in report


def test_csv_with_the_same_columns_and_match_labels(folder):
    (folder / "pairs.csv").write_text("image,text,label,split\nimg/red.png,a red square,1,train\n"
                                      "img/blue.jpg,a red square,false,val\n,just text,true,\nimg/red.png,x,maybe,\n")
    m = read_manifest(folder / "pairs.csv", "match")
    assert [(e.line, e.label, e.split) for e in m.examples] == [(2, 1, "train"), (3, 0, "val"), (4, 1, None)]
    assert m.skipped == [(5, "bad label: 'maybe' is not a 0/1 or true/false")]
    assert [e.line for e in m.split("val")] == [3]


def test_too_few_usable_rows_is_one_clear_error(folder):
    manifest = write_jsonl(folder / "bad.jsonl", [{"image": "img/nowhere.png", "text": "", "label": "a"}])
    with pytest.raises(DatasetError, match=r"0 usable rows, fewer than the 1 needed[\s\S]*line 1: missing file"):
        read_manifest(manifest)
    (folder / "no_header.csv").write_text("path,caption\nimg/red.png,x\n")
    with pytest.raises(DatasetError, match="needs the columns image, text, label"):
        read_manifest(folder / "no_header.csv")


def test_evaluation_data_keeps_the_heads_classes(folder):
    manifest = write_jsonl(folder / "test.jsonl", [{"text": "x", "label": "red"}, {"text": "y", "label": "green"}])
    m = read_manifest(manifest, classes=("blue", "red"))
    assert m.classes == ("blue", "red") and [e.label for e in m.examples] == ["red"]
    assert m.skipped[0][1].startswith("unknown label: 'green'")
