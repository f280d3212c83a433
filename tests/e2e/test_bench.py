"""`mmfuse bench --quick` end to end: its own real tritonserver, every section measured, outputs within tolerance.

The quick run uses the tiny architecture (so that it fits a test's time); speeds are printed, never asserted:
what is asserted is that every optimisation the bench exercises keeps the outputs (served bf16 embeddings
against fp32 in-process, trimmed against padded text, the exact preprocessing path against open_clip).
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    mmfuse = Path(sys.executable).parent / "mmfuse"
    proc = subprocess.run([str(mmfuse), "bench", "--quick", "--model", "mmfuse-tiny", "--out", str(out)],
                          capture_output=True, text=True, timeout=540)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc.stdout, json.loads(out.read_text())


@pytest.mark.timeout(600)
def test_table_names_every_figure(quick_run):
    stdout, _ = quick_run
    for fragment in ("| peak matmul fp32 |", "| peak matmul bf16 |", "| FLOPs per image |",
                     "| ensemble | served items/s | limit items/s | served/limit | naive items/s | served/naive |",
                     "| embed_image |", "| fuse_image_text |", "| embed_text |", "p99/p50", "fusion step",
                     "text trimming", "precision (in-process", "preprocessing per", "wrote "):
        assert fragment in stdout, fragment


@pytest.mark.timeout(600)
def test_every_served_request_succeeded_and_outputs_are_within_tolerance(quick_run):
    _, result = quick_run
    served = result["served"]
    for name in ("embed_image", "embed_text", "fuse_image_text", "fuse_image_text_at_load"):
        assert served[name]["errors"] == 0 and served[name]["requests"] > 0, name
        assert 0 < served[name]["p50_ms"] <= served[name]["p95_ms"] <= served[name]["p99_ms"], name
    s = result["summary"]
    assert s["served_min_cosine_vs_fp32"] >= 0.99  # served in the profile's bf16 vs fp32 in-process
    assert s["bf16_min_cosine_vs_fp32"] >= 0.99
    assert s["text_trim_max_abs_diff_fp32"] <= 1e-5  # trimmed == padded under the causal mask
    assert result["preprocessing"]["exact_vs_open_clip_max_abs"] == 0.0  # the fast tail is bit-identical
    assert result["preprocessing"]["draft_vs_exact_mean_abs"] < 0.08  # the draft path the profile serves, measured
    assert result["preprocessing"]["draft_vs_exact_embedding_min_cosine"] >= 0.99
    # The cpu profile folds image decoding into the image encoder (decode_images): no image_preprocess model.
    assert "image_preprocess" not in result["configs"] and 'key: "decode_images"' in result["configs"]["image_encoder"]
    assert result["served_jpeg_draft"] is True and 'key: "jpeg_draft"' in result["configs"]["image_encoder"]
    # The image encoder is served by OpenVINO in the cpu profile: its in-process parity, and the served check above
    # (served bf16 embeddings vs torch fp32 in-process) went through it.
    assert result["served_engine"] == "openvino" and 'string_value: "openvino"' in result["configs"]["image_encoder"]
    assert result["precision"]["bf16"]["image_openvino_min_cosine_vs_fp32"] >= 0.99
    # The text tower too (one OpenVINO graph for every trimmed length).
    assert 'string_value: "openvino"' in result["configs"]["text_encoder"]
    assert result["precision"]["bf16"]["text_openvino_min_cosine_vs_fp32"] >= 0.99
    assert result["precision"]["fp32"]["text_openvino_min_cosine_vs_fp32"] >= 0.9999
    assert result["precision"]["fp32"]["image_openvino_min_cosine_vs_fp32"] >= 0.9999


@pytest.mark.timeout(600)
def test_limit_ratios_and_statistics_are_consistent(quick_run):
    _, result = quick_run
    limit, flops, s = result["limit"], result["flops"], result["summary"]
    assert limit["dtype"] == ("bf16" if result["machine"]["bf16_matrix_units"] else "fp32")
    assert limit["embed_image_per_s"] == pytest.approx(limit["peak_gflops"] * 1e9 / flops["image_flops"])
    for name in ("embed_image", "fuse_image_text", "embed_text"):
        e = s[name]
        assert e["served_over_limit"] == pytest.approx(e["served_per_s"] / e["limit_per_s"])
        assert e["served_over_naive"] == pytest.approx(e["served_per_s"] / e["naive_per_s"])
    at_load = result["served"]["fuse_image_text_at_load"]
    models = at_load["models"]
    for model in ("fuse_image_text", "image_encoder", "text_preprocess", "text_encoder", "fusion"):
        assert models[model]["requests"] > 0, model
    assert "image_preprocess" not in models
    assert at_load["fusion_ms"] == pytest.approx(models["fusion"]["request_ms"])
    assert 0 < at_load["fusion_share_of_p50"] < 1
    # Late fusion, served as a late deployment: the encoders' token sequences are not routed to the fusion step.
    assert "SEQUENCE" not in result["configs"]["fuse_image_text"]
    assert result["summary"]["ceiling"]["embed_image_over_limit"] > 0
    measured = result["ceiling_measured"]  # every core decoding and encoding at once, no server
    assert measured["workers"] == result["machine"]["cores"] and min(measured["per_worker_per_s"]) > 0
    assert s["ceiling_measured"]["served_over_ceiling"] == pytest.approx(
        s["embed_image"]["served_per_s"] / measured["embed_image_per_s"])
    from mmfuse.serving.hardware import resolve_precision

    for model in ("image_encoder", "text_encoder"):  # the default profile: auto, chosen for this machine
        assert "# mmfuse profile 'auto'" in result["configs"][model]
        assert f'string_value: "{resolve_precision("auto")}"' in result["configs"][model]
    assert result["served_precision"] == resolve_precision("auto")


@pytest.mark.timeout(600)
def test_served_figures_came_from_perf_analyzer(quick_run):
    """Every served figure was measured by Triton's perf_analyzer (the default load generator), and Triton's own
    statistics saw at least the requests it reports, each with its rows, none failed."""
    stdout, result = quick_run
    served, rows = result["served"], result["options"]["plan"]["rows"]
    assert result["options"]["plan"]["load_generator"] == "perf_analyzer"
    for name in ("embed_image", "embed_text", "fuse_image_text", "fuse_image_text_at_load"):
        run = served[name]
        assert run["load_generator"] == "perf_analyzer", name
        assert run["requests"] > 0 and run["errors"] == 0, name
        line = run["perf_analyzer"]["command_line"].split()
        assert line[0].endswith("perf_analyzer") and line[line.index("-b") + 1] == str(rows), name
        ensemble = "fuse_image_text" if name == "fuse_image_text_at_load" else name
        models = run["models"]
        assert models[ensemble]["requests"] >= run["requests"] and models[ensemble]["failures"] == 0, name
        step = "image_encoder" if name == "embed_image" else "text_preprocess"  # the first step (cpu profile)
        assert sum(int(size) * count for size, count in models[step]["batch_sizes"].items()) == \
            rows * models[step]["requests"], name
    assert "--concurrency-range" in served["embed_text"]["perf_analyzer"]["command_line"]
    assert "--request-rate-range" in served["fuse_image_text_at_load"]["perf_analyzer"]["command_line"]
    for name in ("embed_image", "embed_text", "fuse_image_text"):
        assert result["summary"][name]["load_generator"] == "perf_analyzer"
    assert result["summary"]["at_load"]["load_generator"] == "perf_analyzer"
    assert "load generator: perf_analyzer" in stdout and "fixed rate by perf_analyzer" in stdout


@pytest.mark.timeout(600)
def test_hardware_class_auto_choice_and_every_target_are_printed(quick_run):
    """The run names the hardware class it detected and what auto chose, serves the hand-picked profiles alone
    under the same load, and prints every target with its figure (the figures are not asserted: speeds)."""
    from mmfuse import auto
    from mmfuse.bench.report import target_data

    stdout, result = quick_run
    hw = auto.detect()
    assert result["hardware"]["class"] == hw.hardware_class and result["hardware"]["cores"] == hw.cores
    assert f"hardware class: {hw.hardware_class}" in stdout
    chosen = auto.choose(hw)
    assert result["auto"]["throughput"]["base_profile"] == chosen.base
    assert f"auto chose: profile '{chosen.base}' adapted" in stdout and "auto-latency chose:" in stdout
    for name in ("baseline", "cpu", "latency"):  # each served alone, every request answered
        for ensemble in ("embed_image", "embed_text"):
            run = result["compare"][name][ensemble]
            assert run["requests"] > 0 and run["errors"] == 0 and run["load_generator"] == "perf_analyzer", name
    targets = {t["target"]: t for t in result["summary"]["targets"]}
    data = target_data()
    assert len(targets) == 6
    for name, t in targets.items():
        assert f"| {name} | {t['wanted']} |" in stdout, name
        assert t["ratio"] is not None, name  # every target measured on a CPU
    for ensemble in ("embed_image", "embed_text"):
        t = targets[f"auto vs the best hand-picked profile, {ensemble}"]
        best = max(r[ensemble]["items_per_s"] for r in result["compare"].values())
        assert t["ratio"] == pytest.approx(result["served"][ensemble]["items_per_s"] / best)
        assert t["met"] == (t["ratio"] >= data["auto_over_best_hand_picked"]["at_least"])
    # Single requests: one row, one in flight, by perf_analyzer, on the profile's server and on auto-latency's.
    for runs in (result["served"], result["served_latency"]):
        for ensemble in ("embed_image", "embed_text"):
            run = runs[f"{ensemble}_c1"]
            line = run["perf_analyzer"]["command_line"].split()
            assert line[line.index("-b") + 1] == "1" and run["errors"] == 0
            assert line[line.index("--concurrency-range") + 1].split(":")[0] == "1"
            assert run["models"][ensemble]["requests"] >= run["requests"]
    latency = targets["embed_image p50 at concurrency 1 / in-process single image"]
    assert latency["ratio"] == pytest.approx(result["served_latency"]["embed_image_c1"]["p50_ms"]
                                             / result["single_image"]["p50_ms"])
    assert result["single_image"]["threads"] == hw.cores
