"""`mmfuse eval --data` end to end: a small classify dataset (`mmfuse make-dataset`), two heads trained on it with
`mmfuse train --data` into a copy of the tiny e2e repository (late, then early: each a fusion version folder with
its single-modality references), then `mmfuse eval --data test.jsonl --quick` against a running server with
explicit model control. Checked here, from the report and the per-row outputs it saved:

* the data file (path, sha256 computed here, rows used, the rows skipped with their line numbers);
* both classify heads evaluated through PROBS (LABEL = the argmax class), the shipped match head listed as not
  evaluated; per-class recall, balanced accuracy and macro-F1 recomputed here from the served PROBS;
* retention a number for at least one modality absent, recomputed from the reference heads' outputs;
* the late head as the effective-robustness baseline; load runs on pools of the data's own rows;
* the server's fusion and fuse_image_text configs are the same after the run as before it.
"""
from __future__ import annotations

import base64
import hashlib
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.e2e.conftest import start_server, tiny_repository

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(1200)]

TOL = 2e-6  # report.json rounds to 6 decimals


def _mmfuse(*args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "mmfuse.cli", *args], capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"mmfuse {' '.join(args)}\n{done.stderr[-4000:]}"
    return done


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("classify-data")
    _mmfuse("make-dataset", "classify", "--out", str(folder), "--train", "160", "--val", "32", "--test", "40",
            "--seed", "0")
    test = folder / "test.jsonl"
    lines = test.read_text().splitlines()
    # Two unusable rows: a label no head knows (line 3) and a malformed line (line 6).
    bad = json.loads(lines[0])
    bad["label"] = "no-such-class"
    lines.insert(2, json.dumps(bad))
    lines.insert(5, "{broken")
    test.write_text("\n".join(lines) + "\n")
    return folder


@pytest.fixture(scope="module")
def trained_repository(tmp_path_factory, checkpoint, dataset) -> Path:
    repo = tiny_repository(tmp_path_factory.mktemp("eval-data") / "repo", checkpoint)
    cache = tmp_path_factory.mktemp("feature-cache")
    for strategy in ("late", "early"):
        _mmfuse("train", "--data", str(dataset / "train.jsonl"), "--val", str(dataset / "val.jsonl"), "--task",
                "classify", "--strategy", strategy, "--steps", "150", "--lr", "0.01", "--threads", "1",
                "--cache-dir", str(cache), "--repository", str(repo))
    return repo


@pytest.fixture(scope="module")
def run(trained_repository, dataset, tmp_path_factory) -> dict:
    import tritonclient.grpc as grpcclient

    server = start_server(trained_repository, tmp_path_factory.mktemp("eval-data-logs") / "tritonserver",
                          model_control_mode="explicit")
    try:
        client = grpcclient.InferenceServerClient(server.grpc_url)
        before = {m: client.get_model_config(m).config for m in ("fusion", "fuse_image_text")}
        out = tmp_path_factory.mktemp("eval-data-report")
        done = _mmfuse("eval", "--data", str(dataset / "test.jsonl"), "--out", str(out), "--quick", "--url",
                       server.grpc_url, "--model-repository", str(trained_repository), "--ensembles",
                       "fuse_image_text", "--rates", "4")
        after = {m: client.get_model_config(m).config for m in before}
        ready = client.is_model_ready("fuse_image_text")
        client.close()
    finally:
        server.stop()
    with np.load(out / "scores.npz") as z:
        scores = {k: z[k] for k in z.files}
    return {"out": out, "report": json.loads((out / "report.json").read_text()), "stderr": done.stderr,
            "before": before, "after": after, "ready": ready, "scores": scores}


def test_the_data_file_is_described(run, dataset):
    data = run["report"]["data"]
    test = dataset / "test.jsonl"
    assert data["sha256"] == hashlib.sha256(test.read_bytes()).hexdigest()
    assert data["path"].endswith("test.jsonl") and data["task"] == "classify"
    assert data["rows_skipped"] == 2 and [s["line"] for s in data["skipped"]] == [3, 6]
    assert data["skipped"][0]["reason"].startswith("unknown label")
    assert data["rows_usable"] == 40 and data["rows_used"] == 24  # --quick: 24 rows, classes in turn
    assert sum(data["rows_per_class"].values()) == 24
    md = (run["out"] / "report.md").read_text()
    assert data["sha256"] in md and "| 3 | unknown label" in md


def test_classify_heads_evaluated_with_probs_and_per_class_figures(run, trained_repository):
    rob = run["report"]["robustness"]
    dataset_classes = json.loads((trained_repository / "fusion" / "4" / "fusion_head.json").read_text())["classes"]
    assert rob["mode"] == "data" and rob["task_name"] == "classify" and rob["classes"] == dataset_classes
    assert len(rob["classes"]) == 8 and rob["chance"] == pytest.approx(1 / 8)
    assert set(rob["strategies"]) == {"late", "early"}
    assert "a match head" in " ".join(rob["not_evaluated"].values())  # the shipped head (fusion/2)
    labels = run["scores"]["labels"]
    n = len(labels)
    for name, fig in rob["strategies"].items():
        assert fig["output"] == "PROBS"
        check = fig["label_check"]
        assert check["agree"] == check["rows"] > 0  # LABEL is the argmax class wherever something is present
        assert check["empty_where_nothing_present"] == check["nothing_present"]
        probs = run["scores"][f"{name}|clean"]
        assert probs.shape == (n, 8)
        np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-4)
        predicted = probs.argmax(axis=1)
        recalls = {c: float(np.mean(predicted[labels == i] == i)) for i, c in enumerate(rob["classes"])
                   if np.any(labels == i)}
        clean = fig["clean"]
        assert clean["by_class"] == pytest.approx(recalls, abs=TOL)
        assert clean["balanced"] == pytest.approx(np.mean(list(recalls.values())), abs=TOL)
        f1 = []
        for i in range(8):
            tp = np.sum((predicted == i) & (labels == i))
            fp, fn = np.sum((predicted == i) & (labels != i)), np.sum((predicted != i) & (labels == i))
            if tp + fp + fn:
                f1.append(2 * tp / (2 * tp + fp + fn))
        assert clean["macro_f1"] == pytest.approx(np.mean(f1), abs=TOL)
        # nothing present: uniform PROBS, a constant answer -> balanced accuracy exactly chance
        assert fig["curves"]["dropout"]["levels"] == [0.0, 0.5, 1.0]
        assert fig["curves"]["dropout"]["balanced"][2] == pytest.approx(1 / 8, abs=TOL)
        assert set(fig["curves"]["noise"]["by_class"]) == set(recalls)
    assert rob["baseline"] == "late"
    early = rob["strategies"]["early"]["curves"]["noise"]
    late = rob["strategies"]["late"]["curves"]["noise"]["balanced"]
    shifted = [b - (lv - late[0] + early["balanced"][0]) for b, lv in zip(early["balanced"], late)]
    assert early["effective_robustness"] == pytest.approx(shifted, abs=TOL)


def _balanced(probs: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    predicted = probs.argmax(axis=1)
    rates = []
    var = 0.0
    present = [i for i in range(probs.shape[1]) if np.any(labels == i)]
    for i in present:
        rows = int(np.sum(labels == i))
        correct = int(np.sum((labels == i) & (predicted == i)))
        rates.append(correct / rows)
        r = (correct + 1) / (rows + 2)
        var += (1 / len(present)) ** 2 * r * (1 - r) / rows
    return float(np.mean(rates)), math.sqrt(var)


def test_retention_against_the_reference_heads(run):
    rob = run["report"]["robustness"]
    scores, labels = run["scores"], run["scores"]["labels"]
    numbers = 0
    for name, fig in rob["strategies"].items():
        source = rob["single_modality"]["of_strategy"][name]
        assert source is not None and source.endswith(("fusion/3", "fusion/4"))
        for absent, remaining in (("image", "text"), ("text", "image")):
            key = f"dropout_{absent}@1.0"
            ref = scores[f"reference:{source}:{remaining}|{key}"]
            # the reference of the removed modality sees nothing: uniform
            np.testing.assert_allclose(scores[f"reference:{source}:{absent}|{key}"], 1 / 8, atol=1e-6)
            ref_acc, ref_se = _balanced(ref, labels)
            acc, _ = _balanced(scores[f"{name}|{key}"], labels)
            entry = fig["retention"][f"{absent}_absent"]
            assert entry["accuracy"] == pytest.approx(acc, abs=TOL)
            assert entry["reference_accuracy"] == pytest.approx(ref_acc, abs=TOL)
            if ref_acc - 1 / 8 > 2 * ref_se:
                assert entry["retention"] == pytest.approx((acc - 1 / 8) / (ref_acc - 1 / 8), abs=1e-5)
                numbers += 1
            else:
                assert entry["retention"] is None
    assert numbers >= 1, "retention is n/a everywhere: the references did not learn"


def test_served_configs_restored_and_load_on_the_data_rows(run, dataset):
    assert run["after"] == run["before"] and run["ready"]
    load = run["report"]["load"]
    assert {r["ensemble"] for r in load["runs"]} == {"fuse_image_text"}
    for r in load["runs"]:
        assert r["completed"] + sum(r["errors"].values()) == r["sent"] and not r["errors"]
        assert r["latency_ms"]["p50"] <= r["latency_ms"]["p95"] <= r["latency_ms"]["p99"]
    assert [r["strategy"] for r in load["strategy_overhead"]] == ["late", "early"]
    assert all(0 < r["server"]["fusion_share"] < 1 for r in load["strategy_overhead"])
    entry = load["perf_analyzer"]["commands"]["fuse_image_text"]
    pool = json.loads((run["out"] / entry["input_data"]).read_text())["data"]
    sent = {base64.b64decode(row["IMAGE"]["b64"])[4:] for row in pool}
    images = {p.read_bytes() for p in dataset.rglob("*.png")}
    assert sent and sent <= images  # the requests carry the data's own images
    md = (run["out"] / "report.md").read_text()
    assert "| late | fusion/3 | PROBS |" in md and "| early | fusion/4 | PROBS |" in md
    for png in ("robustness", "auc", "effective_robustness", "late_kinds", "early_kinds", "corruptions", "latency"):
        assert (run["out"] / f"{png}.png").is_file(), png

