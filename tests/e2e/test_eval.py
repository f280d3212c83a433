"""`mmfuse eval --quick` end to end: the real command starts the real server, and every figure of its report
is checked against values computed here, independently.

The repository is the tiny one of the e2e tests with three heads exported as fusion versions (as
`mmfuse train` does): a late similarity head, an early head and a Flamingo-style attention head. What
the test computes on its own:

* every SCORE the report used, from open_clip and the heads run in this process on the same
  corrupted inputs (decoded here with PIL);
* from those scores: accuracy per kind, balanced accuracy, the area under each curve (numpy's
  trapezoid), effective robustness against the late head, retention and the catastrophic flags;
* for the load runs: requests sent = completed + errors, the server's request count for the
  ensemble = requests completed, rows batched by each composing model = requests it served, and the
  latency percentiles from the recorded latencies.
"""
from __future__ import annotations

import io
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mmfuse import shapes
from mmfuse.eval import corruptions as C
from tests.e2e.conftest import Reference, tiny_repository

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(900)]  # the first test waits for the whole `mmfuse eval --quick`

SEED = 11
HEADS = {
    "late": ("late", {"gate": "fixed", "head": "similarity"}),
    "early": ("early", {"hidden": 32}),
    "attention": ("attention", {"image_width": 64, "text_width": 64, "dim": 32, "heads": 2, "layers": 1,
                                "image_tokens": 16}),
}
KINDS = ("positive", "swapped", "attribute")
TOL = 2e-6  # report.json rounds its figures to 6 decimals


@pytest.fixture(scope="module")
def eval_repository(tmp_path_factory, checkpoint) -> Path:
    import shutil

    from mmfuse.export import export_head
    from mmfuse.serving.strategies import build

    repo = tiny_repository(tmp_path_factory.mktemp("eval") / "repo", checkpoint)
    for version in (repo / "fusion").iterdir():  # the shipped repository's own heads: not for these encoders
        if version.name.isdigit() and version.name != "1":
            shutil.rmtree(version)
    for preset, (strategy, options) in HEADS.items():
        torch.manual_seed(SEED)
        head = build(strategy, ("IMAGE", "TEXT"), 64, **options).eval()
        if preset == "late":
            with torch.no_grad():  # spread the scores: cosines of the tiny random towers are small
                head.scale.fill_(40.0)
                head.bias.fill_(-4.0)
        export_head(repo, "fusion", head, {"training": {"config": {"preset": preset}}})
    return repo


@pytest.fixture(scope="module")
def report_dir(eval_repository, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("eval-report")
    command = [sys.executable, "-m", "mmfuse.cli", "eval", "--out", str(out), "--quick",
               "--model-repository", str(eval_repository), "--ensembles", "embed_text", "fuse_image_text",
               "--rates", "4"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "[mmfuse eval] report written" in done.stderr
    return out


@pytest.fixture(scope="module")
def report(report_dir) -> dict:
    return json.loads((report_dir / "report.json").read_text())


@pytest.fixture(scope="module")
def served_scores(report_dir) -> dict:
    with np.load(report_dir / "scores.npz") as z:
        return {k: z[k] for k in z.files}


def _decode(data: bytes):
    from PIL import Image

    try:
        image = Image.open(io.BytesIO(data))
        image.load()
        return image.convert("RGB")
    except Exception:  # noqa: BLE001 - empty, truncated: the modality is absent
        return None


@pytest.fixture(scope="module")
def expected_scores(report, checkpoint, eval_repository) -> dict[str, dict[str, np.ndarray]]:
    """SCORE of every head under every condition, computed in this process."""
    import open_clip

    from mmfuse.serving.strategies import FusionBatch, load_head
    from mmfuse.training import Encoders, create_clip

    rob = report["robustness"]
    assert rob["dataset"]["per_kind"] == 4 and rob["levels"] == [0.0, 0.5, 1.0]
    examples = shapes.balanced(4, 0)
    images = [shapes.png_bytes(e.image) for e in examples]
    texts = [e.caption for e in examples]
    conditions = {"clean": (images, texts)}
    for name in rob["corruptions"]:
        for level in (0.5, 1.0):
            conditions[f"{name}@{level:.1f}"] = C.apply(name, level, images, texts, 0)

    clip = create_clip("mmfuse-tiny", 0, checkpoint).eval()
    preprocess = Reference(checkpoint).preprocess
    tokenizer = open_clip.get_tokenizer("mmfuse-tiny")
    encoded = {}
    for key, (imgs, txts) in conditions.items():
        decoded = [_decode(x) for x in imgs]
        present = torch.tensor([[d is not None, bool(t.strip())] for d, t in zip(decoded, txts)])
        pixels = torch.stack([preprocess(d) if d is not None else torch.zeros(3, 64, 64) for d in decoded])
        with torch.no_grad():
            embeddings, sequences, masks = Encoders(clip)(pixels, tokenizer(txts))
        encoded[key] = (embeddings * present.unsqueeze(-1), present, sequences, masks)

    out = {}
    for version in sorted(p for p in (eval_repository / "fusion").iterdir() if p.name.isdigit()):
        if not (version / "fusion_head.json").is_file():
            continue
        module, description = load_head(version)
        name = description["training"]["config"]["preset"]
        out[name] = {}
        for key, (emb, present, seqs, masks) in encoded.items():
            with torch.no_grad():
                logit = module(FusionBatch(emb, present, seqs, masks)).logit
            out[name][key] = torch.sigmoid(logit).numpy()
    return out


def test_every_head_found_and_served(report):
    rob = report["robustness"]
    assert [h["name"] for h in rob["heads"]] == ["late", "early", "attention"]
    assert rob["baseline"] == "late"  # a trained late similarity head exists: no fitted one
    assert set(rob["strategies"]) == set(HEADS) and not rob["not_evaluated"]
    assert len(rob["corruptions"]) == len(C.CORRUPTIONS)


def test_served_scores_equal_in_process_scores(served_scores, expected_scores):
    checked = 0
    for strategy, per_condition in expected_scores.items():
        for key, expected in per_condition.items():
            np.testing.assert_allclose(served_scores[f"{strategy}|{key}"], expected, atol=2e-4,
                                       err_msg=f"{strategy} under {key}")
            checked += 1
    assert checked == 3 * (1 + 2 * len(C.CORRUPTIONS))


def _accuracy(scores: np.ndarray, labels: list[int], kinds: list[str]) -> dict[str, float]:
    out = {}
    for kind in KINDS:
        rows = [i for i, k in enumerate(kinds) if k == kind]
        out[kind] = sum((scores[i] > 0.5) == (labels[i] == 1) for i in rows) / len(rows)
    out["balanced"] = 0.5 * out["positive"] + 0.25 * (out["swapped"] + out["attribute"])
    return out


def test_accuracy_curves_auc_and_effective_robustness(report, expected_scores):
    rob = report["robustness"]
    examples = shapes.balanced(4, 0)
    labels, kinds = [e.label for e in examples], [e.kind for e in examples]
    for strategy, per_condition in expected_scores.items():
        fig = rob["strategies"][strategy]
        for key, scores in per_condition.items():
            acc = _accuracy(scores, labels, kinds)
            name, _, level = key.partition("@")
            curve = fig["curves"]["noise" if key == "clean" else name]
            i = curve["levels"].index(float(level or 0))
            assert curve["balanced"][i] == pytest.approx(acc["balanced"], abs=TOL), (strategy, key)
            for kind in KINDS:
                assert curve["by_kind"][kind][i] == pytest.approx(acc[kind], abs=TOL), (strategy, key, kind)
        clean = _accuracy(per_condition["clean"], labels, kinds)["balanced"]
        assert fig["clean"]["balanced"] == pytest.approx(clean, abs=TOL)
        for name, curve in fig["curves"].items():
            keys = ["clean", f"{name}@0.5", f"{name}@1.0"]
            balanced = [_accuracy(per_condition[k], labels, kinds)["balanced"] for k in keys]
            assert curve["balanced"] == pytest.approx(balanced, abs=TOL)
            assert curve["relative_robustness"] == pytest.approx(float(np.trapz(balanced, [0.0, 0.5, 1.0])), abs=TOL)
            late = [_accuracy(expected_scores["late"][k], labels, kinds)["balanced"] for k in keys]
            shifted = [b - (lv - late[0] + balanced[0]) for b, lv in zip(balanced, late)]
            assert curve["effective_robustness"] == pytest.approx(shifted, abs=TOL)
            if strategy == "late":
                assert curve["effective_robustness"] == pytest.approx([0.0, 0.0, 0.0])


def test_single_modality_models_retention_and_flags(report, served_scores):
    rob = report["robustness"]
    examples = shapes.balanced(4, 0)
    labels, kinds = [e.label for e in examples], [e.kind for e in examples]
    # A removed modality: the single-modality model of that modality cannot decide (0.5 everywhere).
    np.testing.assert_array_equal(served_scores["single:image|dropout_image@1.0"], 0.5)
    np.testing.assert_array_equal(served_scores["single:text|dropout_text@1.0"], 0.5)

    def se(scores):
        var = 0.0
        for kind, weight in zip(KINDS, (0.5, 0.25, 0.25)):
            rows = [i for i, k in enumerate(kinds) if k == kind]
            correct = sum((scores[i] > 0.5) == (labels[i] == 1) for i in rows)
            rate = (correct + 1) / (len(rows) + 2)
            var += weight ** 2 * rate * (1 - rate) / len(rows)
        return math.sqrt(var)

    single_clean = {m: _accuracy(served_scores[f"single:{m}|clean"], labels, kinds)["balanced"] for m in ("image", "text")}
    best = max(single_clean.values())
    best_se = se(served_scores[f"single:{max(single_clean, key=single_clean.get)}|clean"])
    for strategy, fig in rob["strategies"].items():
        expected_flags = []
        for name in rob["corruptions"]:
            for level in (0.0, 0.5, 1.0):
                key = "clean" if level == 0 else f"{name}@{level:.1f}"
                mine = served_scores[f"{strategy}|{key}"]
                singles = [served_scores[f"single:{m}|{key}"] for m in ("image", "text")]
                accs = [_accuracy(s, labels, kinds)["balanced"] for s in singles]
                ref = singles[int(np.argmax(accs))] if accs[0] != accs[1] else singles[0]
                gap = _accuracy(mine, labels, kinds)["balanced"] - _accuracy(ref, labels, kinds)["balanced"]
                if gap < -1.96 * math.sqrt(se(mine) ** 2 + se(ref) ** 2):
                    expected_flags.append((name, level))
        assert [(f["corruption"], f["level"]) for f in fig["flags"]] == expected_flags, strategy
        for absent in ("image", "text"):
            acc = _accuracy(served_scores[f"{strategy}|dropout_{absent}@1.0"], labels, kinds)["balanced"]
            entry = fig["retention"][f"{absent}_absent"]
            assert entry["accuracy"] == pytest.approx(acc, abs=TOL)
            if best - 0.5 <= 2 * best_se:
                assert entry["retention"] is None
            else:
                assert entry["retention"] == pytest.approx((acc - 0.5) / (best - 0.5), abs=TOL)


def test_load_runs_agree_with_the_server_statistics(report, report_dir):
    load = report["load"]
    ensembles = {r["ensemble"] for r in load["runs"]}
    assert ensembles == {"embed_text", "fuse_image_text"}
    for r in load["runs"]:
        assert r["sent"] <= 24 and r["completed"] + sum(r["errors"].values()) == r["sent"]
        assert r["server"]["ensemble"]["requests"] == r["completed"], r
        for step, s in r["server"]["steps"].items():
            rows = sum(int(size) * count for size, count in s["batch_sizes"].items())
            assert rows == s["requests"] == r["completed"], (r["ensemble"], step, s)
            assert s["executions"] == sum(s["batch_sizes"].values())
        lat = r["latency_ms"]
        assert lat["p50"] <= lat["p95"] <= lat["p99"]
        assert r["throughput_per_s"] == pytest.approx(r["completed"] / r["seconds"], rel=1e-2)
        if r["ensemble"] == "fuse_image_text":
            assert 0 < r["server"]["fusion_share"] < 1
        assert r["memory"]["peak_rss_bytes"] >= r["memory"]["idle_rss_bytes"] > 0
    modes = {(r["ensemble"], r["mode"], r.get("concurrency", r.get("rate_per_s"))) for r in load["runs"]}
    assert ("fuse_image_text", "open", 4.0) in modes and ("embed_text", "closed", 4) in modes
    assert [r["strategy"] for r in load["strategy_overhead"]] == ["late", "early", "attention"]
    for e in ensembles:
        data = json.loads((report_dir / load["perf_analyzer"]["commands"][e]["input_data"]).read_text())
        assert len(data["data"]) > 0
        assert any(f"-m {e} " in line for line in load["perf_analyzer"]["commands"][e]["lines"])


def test_markdown_and_plots(report_dir, report):
    from PIL import Image

    md = (report_dir / "report.md").read_text()
    for strategy in HEADS:
        assert f"| {strategy} |" in md
    for name in ("robustness", "auc", "effective_robustness", "corruptions", "latency", "breakdown",
                 "late_kinds", "early_kinds", "attention_kinds"):
        path = report_dir / f"{name}.png"
        assert f"({name}.png)" in md
        with Image.open(path) as image:
            assert image.format == "PNG" and image.width >= 600 and image.height >= 200


def _eval(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mmfuse.cli", "eval", *args], capture_output=True, text=True,
                          timeout=900)


def test_running_server_gets_its_configs_back(eval_repository, tmp_path_factory):
    """--url: the heads are switched on the given server, whose served configs are put back afterwards."""
    import tritonclient.grpc as grpcclient

    from tests.e2e.conftest import start_server

    server = start_server(eval_repository, tmp_path_factory.mktemp("eval-url-logs") / "tritonserver",
                          model_control_mode="explicit")
    try:
        client = grpcclient.InferenceServerClient(server.grpc_url)
        before = {m: client.get_model_config(m).config for m in ("fusion", "fuse_image_text")}
        out = tmp_path_factory.mktemp("eval-url")
        done = _eval("--out", str(out), "--url", server.grpc_url, "--quick", "--no-load", "--corruptions", "dropout",
                     "--levels", "0,1", "--model-repository", str(eval_repository))
        assert done.returncode == 0, done.stderr[-4000:]
        report = json.loads((out / "report.json").read_text())
        assert report["server"]["pid"] == server.process.pid and not report["server"]["embedded"]
        assert set(report["robustness"]["strategies"]) == set(HEADS)
        assert {m: client.get_model_config(m).config for m in before} == before
        assert client.is_model_ready("fuse_image_text")
    finally:
        server.stop()


def test_server_without_model_control_is_evaluated_as_served(server, eval_repository, tmp_path):
    """The session server has no model control: no head can be switched in; what it serves is evaluated if
    its fuse_image_text has a SCORE, and the report says why the heads were not."""
    import tritonclient.grpc as grpcclient

    outputs = [o.name for o in grpcclient.InferenceServerClient(server.grpc_url).get_model_config(
        "fuse_image_text").config.output]
    done = _eval("--out", str(tmp_path), "--url", server.grpc_url, "--quick", "--no-load", "--corruptions", "dropout",
                 "--levels", "0,1", "--model-repository", str(eval_repository))
    assert done.returncode == 0, done.stderr[-4000:]
    report = json.loads((tmp_path / "report.json").read_text())
    rob = report["robustness"]
    assert set(rob["not_evaluated"]) == {"late", "early", "attention"}
    assert all("model control" in why for why in rob["not_evaluated"].values())
    if "SCORE" in outputs:
        assert "no model control: evaluating what the server serves" in done.stderr
        (name,) = rob["strategies"]
        assert name.startswith("served (strategy ")
        curve = rob["strategies"][name]["curves"]["dropout"]
        assert curve["levels"] == [0.0, 1.0] and curve["balanced"][1] == 0.5  # nothing present: 0.5 everywhere
    else:
        assert "no model control and the served fuse_image_text has no SCORE" in done.stderr
        assert rob["strategies"] == {}
    assert (tmp_path / "report.md").is_file()
