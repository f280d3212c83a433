"""Fusion on the user's own data, end to end on a real tritonserver (issue #14's "Done when").

`mmfuse make-dataset classify|match` writes small datasets as a user would have them (PNG files + JSONL);
`mmfuse train --data` trains heads on the frozen encoders of a copy of the tiny e2e repository and exports them;
the server serves that repository; `mmfuse gen-clients` writes clients that are imported and called. Checked:

* classify (attention, modality dropout 0.3): the ensemble answers PROBS [C] (softmax, in class order) and LABEL
  (the argmax class name; empty with nothing present), declared so in the config, the generated client and
  `mmfuse metadata`; no SCORE;
* the served PROBS equal the exported head run in this process on the cached features, clean and with the
  image or the text removed (the answer with the image removed comes from the text alone, and vice versa);
* the feature cache equals what the server returns (embed_image / embed_text EMBEDDING vs the cached pooled
  embeddings); a second strategy's run reads the cache instead of encoding again;
* the exported version: head JSON (task, classes, data sha256, command, seed, time, validation with each
  modality removed, references), the single-modality reference heads beside it;
* match (late-gmu): SCORE in [0, 1] and no PROBS/LABEL;
* bad rows (missing file, undecodable image, bad label, malformed line) are reported with line numbers and
  the run goes on; too few usable rows fail with exit status 2 and a clear message.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.e2e.conftest import start_server, tiny_repository

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(1500)]


def _mmfuse(*args: str, expect: int = 0, timeout: int = 900) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "mmfuse.cli", *args], capture_output=True, text=True, timeout=timeout)
    assert done.returncode == expect, f"mmfuse {' '.join(args)} -> {done.returncode}\n{done.stderr[-4000:]}"
    return done


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def work(tmp_path_factory, checkpoint) -> dict:
    """Datasets, a trained repository (classify attention head, then a late head reading the same cache)."""
    root = tmp_path_factory.mktemp("own-data")
    classify, match = root / "classify", root / "match"
    _mmfuse("make-dataset", "classify", "--out", str(classify), "--train", "200", "--val", "40", "--test", "24")
    _mmfuse("make-dataset", "match", "--out", str(match), "--train", "160", "--val", "32", "--test", "16")
    # Unusable rows in the training file: a missing image file, an undecodable image, a malformed line.
    (classify / "images" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    lines = (classify / "train.jsonl").read_text().splitlines()
    lines.insert(1, json.dumps({"image": "images/nowhere.png", "text": "a red thing", "label": "circle-red-left"}))
    lines.insert(3, json.dumps({"image": "images/broken.png", "text": "a red thing", "label": "circle-red-left"}))
    lines.insert(5, "{not json")
    (classify / "train.jsonl").write_text("\n".join(lines) + "\n")

    repo = tiny_repository(root / "repo", checkpoint)
    cache = root / "cache"
    common = ("--threads", "1", "--cache-dir", str(cache), "--repository", str(repo))
    first = _mmfuse("train", "--data", str(classify / "train.jsonl"), "--val", str(classify / "val.jsonl"), "--task",
                    "classify", "--strategy", "late", "--steps", "60", *common)
    second = _mmfuse("train", "--data", str(classify / "train.jsonl"), "--val", str(classify / "val.jsonl"), "--task",
                     "classify", "--strategy", "attention", "--modality-dropout", "0.3", "--steps", "150", "--lr",
                     "3e-3", *common)
    return {"root": root, "classify": classify, "match": match, "repo": repo, "cache": cache, "first": first,
            "second": second}


@pytest.fixture(scope="module")
def served(work, tmp_path_factory):
    server = start_server(work["repo"], tmp_path_factory.mktemp("own-data-logs") / "tritonserver",
                          model_control_mode="explicit")
    yield server
    server.stop()


def _generated_client(work) -> object:
    out = work["root"] / "clients"
    _mmfuse("gen-clients", "--model-repository", str(work["repo"]), "--out", str(out))
    spec = importlib.util.spec_from_file_location("own_fuse_image_text", out / "fuse_image_text.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def _head(work):
    from mmfuse.serving.strategies import load_head

    version = max(int(p.name) for p in (work["repo"] / "fusion").iterdir() if p.name.isdigit())
    folder = work["repo"] / "fusion" / str(version)
    head, description = load_head(folder)
    return folder, head, description


def _test_split(work):
    from mmfuse.datasets import read_manifest
    from mmfuse.features import extract

    _, _, description = _head(work)
    manifest = read_manifest(work["classify"] / "test.jsonl", "classify", classes=description["classes"])
    cache = extract(work["repo"], manifest, cache_dir=work["cache"], progress=False)
    return manifest, cache


def test_bad_rows_are_reported_with_line_numbers_and_the_run_goes_on(work):
    err = work["first"].stderr
    assert "3 skipped" in err
    assert "line 2: missing file" in err and "line 4: undecodable image" in err and "line 6: malformed" in err


def test_a_second_strategy_reads_the_feature_cache(work):
    assert "features of" in work["first"].stderr  # encoded once
    assert "train.jsonl: features from the cache" in work["second"].stderr
    assert "val.jsonl: features from the cache" in work["second"].stderr
    summary = json.loads(work["second"].stdout.splitlines()[0])
    assert summary["strategy"] == "attention" and set(summary["validation"]) == {"clean", "no_image", "no_text"}


def test_the_exported_version_records_data_task_classes_and_validation(work):
    folder, head, description = _head(work)
    train = work["classify"] / "train.jsonl"
    classes = sorted({r["label"] for r in _rows(work["classify"] / "val.jsonl")})
    assert description["task"] == "classify" and description["classes"] == classes == list(head.classes)
    assert description["strategy"] == "attention" and head.needs_sequences
    training = description["training"]
    assert training["data"]["sha256"] == hashlib.sha256(train.read_bytes()).hexdigest()
    assert training["data"]["rows"] == 200 and training["data"]["skipped"] == 3
    assert training["val"]["rows"] == 40
    assert "--modality-dropout 0.3" in training["command"] and training["seed"] == 0
    assert training["config"]["modality_dropout"] == 0.3 and training["created_utc"].endswith("Z")
    validation = description["validation"]
    for key in ("clean", "no_image", "no_text"):
        assert 0.0 <= validation[key]["accuracy"] <= 1.0 and validation[key]["rows"] == 40
    assert validation["chance"] < 0.5
    from mmfuse.serving.strategies import load_head

    for modality in ("image", "text"):
        ref, ref_description = load_head(folder / "references" / modality)
        assert ref.modalities == (modality.upper(),) and list(ref.classes) == classes
        assert ref_description["reference_of"] == "attention"
        assert 0.0 <= description["references"][modality.upper()]["validation"]["accuracy"] <= 1.0


def test_the_ensemble_declares_probs_and_label_and_metadata_the_classes(work, served):
    from mmfuse.repository import load_config

    outputs = {o.name: list(o.dims) for o in load_config(work["repo"], "fuse_image_text").output}
    _, head, _ = _head(work)
    assert outputs["PROBS"] == [len(head.classes)] and outputs["LABEL"] == [1] and "SCORE" not in outputs
    meta = json.loads(_mmfuse("metadata", "--url", served.grpc_url).stdout)
    assert meta["models"]["fuse_image_text"]["classes"] == list(head.classes)


def test_served_probs_equal_the_head_on_the_cache_with_each_modality_removed(work, served):
    from mmfuse.fit import predict

    module = _generated_client(work)
    _, head, _ = _head(work)
    manifest, cache = _test_split(work)
    rows = np.arange(cache.rows)
    images = [e.image.read_bytes() for e in manifest.examples]
    texts = [e.text.encode() for e in manifest.examples]
    empty = [b""] * len(rows)
    with module.FuseImageTextClient(served.grpc_url) as client:
        for image, text, drop in ((images, texts, None), (empty, texts, "IMAGE"), (images, empty, "TEXT")):
            response = client.fuse_image_text(image=image, text=text)
            expected = predict(head, cache, rows, drop=drop)
            assert response.probs.shape == (len(rows), len(head.classes))
            np.testing.assert_allclose(response.probs.sum(axis=1), 1.0, atol=1e-5)
            np.testing.assert_allclose(response.probs, expected, atol=2e-4)
            labels = [v[0].decode() for v in response.label]
            assert labels == [head.classes[i] for i in response.probs.argmax(axis=1)]
        # With the image removed, the answer depends on the text only: another image changes nothing ...
        no_image = client.fuse_image_text(image=empty, text=texts).probs
        assert not np.allclose(no_image, no_image[::-1])  # ... and different texts give different answers
        nothing = client.fuse_image_text(image=empty, text=empty)
        np.testing.assert_allclose(nothing.probs, 1.0 / len(head.classes), atol=1e-6)
        assert all(v[0] == b"" for v in nothing.label)


def test_the_cache_equals_what_the_server_returns(work, served):
    from mmfuse.clients import MMFuseClient

    manifest, cache = _test_split(work)
    assert cache.hit
    pooled, present = cache.pooled()
    assert present.all()
    with MMFuseClient(served.grpc_url, timeout_s=60) as client:
        image = client.embed_image([e.image.read_bytes() for e in manifest.examples])
        text = client.embed_text([e.text for e in manifest.examples])
    np.testing.assert_allclose(image.embedding, pooled[:, cache.modalities.index("IMAGE")], atol=1e-5)
    np.testing.assert_allclose(text.embedding, pooled[:, cache.modalities.index("TEXT")], atol=1e-5)


def test_a_match_head_answers_score(work, served, tmp_path):
    import tritonclient.grpc as grpcclient

    _mmfuse("train", "--data", str(work["match"] / "train.jsonl"), "--task", "match", "--strategy", "late-gmu",
            "--steps", "60", "--threads", "1", "--cache-dir", str(work["cache"]), "--repository", str(work["repo"]))
    from mmfuse.repository import load_config

    outputs = {o.name for o in load_config(work["repo"], "fuse_image_text").output}
    assert "SCORE" in outputs and not outputs & {"PROBS", "LABEL"}
    client = grpcclient.InferenceServerClient(served.grpc_url)
    try:
        for model in ("fusion", "fuse_image_text"):
            client.load_model(model)
        rows = _rows(work["match"] / "test.jsonl")[:4]
        image = np.array([[(work["match"] / r["image"]).read_bytes()] for r in rows], dtype=object)
        text = np.array([[r["text"].encode()] for r in rows], dtype=object)
        inputs = [grpcclient.InferInput("IMAGE", list(image.shape), "BYTES"),
                  grpcclient.InferInput("TEXT", list(text.shape), "BYTES")]
        inputs[0].set_data_from_numpy(image)
        inputs[1].set_data_from_numpy(text)
        result = client.infer("fuse_image_text", inputs)
        score = result.as_numpy("SCORE")
        assert score.shape == (4, 1) and np.all((score >= 0) & (score <= 1))
        assert result.as_numpy("PROBS") is None
    finally:
        client.close()


def test_too_few_usable_rows_fail_with_a_clear_message(work, tmp_path):
    few = tmp_path / "few.jsonl"
    few.write_text("\n".join(_rows_text(work["classify"] / "train.jsonl")[:5]) + "\n")
    done = _mmfuse("train", "--data", str(few), "--task", "classify", "--strategy", "late", "--no-export",
                   "--cache-dir", str(work["cache"]), expect=2)
    assert "fewer than the 8 needed" in done.stderr and "Traceback" not in done.stderr


def _rows_text(path: Path) -> list[str]:
    return [line for line in path.read_text().splitlines() if line.startswith('{"')]
