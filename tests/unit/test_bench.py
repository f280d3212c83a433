"""mmfuse.bench without a server: the limit's arithmetic, the generated repository, the profiles, the report."""
from __future__ import annotations

import math
import os

import numpy as np
import pytest

from mmfuse import bench
from mmfuse.profiles import load_profile
from mmfuse.repository import load_config, parameters
from mmfuse.serving.params import ModelContext, Params
from tests.unit.conftest import TINY


def test_analytic_flops_are_the_counted_ones_plus_the_attention_products(open_clip_tiny):
    """The flop counter misses the CPU attention kernel's two products (QK^T and AV): exactly 4*T^2*W per layer."""
    cfg = open_clip_tiny.get_model_config(TINY)
    flops = bench.model_flops(TINY, text_tokens=14, context_length=77)
    vision, text = cfg["vision_cfg"], cfg["text_cfg"]
    tokens = (vision["image_size"] // vision["patch_size"]) ** 2 + 1
    assert flops["image_flops_analytic"] - flops["image_flops_counted"] == vision["layers"] * 4 * tokens**2 * vision["width"]
    assert flops["text_flops_analytic"] - flops["text_flops_counted"] == text["layers"] * 4 * 14**2 * text["width"]
    assert flops["image_flops"] == flops["image_flops_analytic"] and flops["text_flops"] == flops["text_flops_analytic"]
    assert flops["text_flops_padded"] > 5 * flops["text_flops"]


def test_vit_b_32_costs_what_the_literature_says():
    """ViT-B-32 at 224: 4.4 GMACs per image; its text tower 2.9 GMACs at 77 tokens."""
    import open_clip

    cfg = open_clip.get_model_config("ViT-B-32")
    assert bench.vit_flops(cfg["vision_cfg"], cfg["embed_dim"]) / 2e9 == pytest.approx(4.41, abs=0.02)
    assert bench.text_flops(cfg["text_cfg"], cfg["embed_dim"], 77) / 2e9 == pytest.approx(2.98, abs=0.02)
    assert bench.vit_flops({"timm_model_name": "convnext_base", "width": 1, "layers": 1}, 512) is None


def test_matmul_rate_is_a_rate():
    rate = bench.matmul_rate("fp32", 128, threads=1, seconds=0.01)
    assert math.isfinite(rate) and rate > 0.1  # GFLOP/s
    peak = bench.machine_peak(quick=True)
    for dtype in ("fp32", "bf16"):
        p = peak[dtype]
        assert p["peak_gflops"] == max(p["all_threads_gflops"], p["one_thread_gflops"] * (os.cpu_count() or 1))
        assert p["emulated"] is False
    assert bench.machine_peak(quick=True, bf16_units=False)["bf16"]["emulated"] is True  # measured small, marked


def test_inputs_are_deterministic_jpegs():
    import io

    from PIL import Image

    images, captions = bench.bench_inputs(3, 160, 120)
    again, _ = bench.bench_inputs(3, 160, 120)
    assert images == again and len(set(images)) == 3 and len(captions) == 3
    assert Image.open(io.BytesIO(images[0])).format == "JPEG" and Image.open(io.BytesIO(images[0])).size == (160, 120)


@pytest.mark.parametrize("profile", sorted(bench.PROFILES))
def test_generated_repository(tmp_path, profile):
    repo = bench.build_repository(tmp_path / "repo", "ViT-B-32", profile)
    merged = load_profile(profile).merges_decoding
    expected = [m for m in bench.BENCH_MODELS if not (merged and m == "image_preprocess")]
    assert sorted(p.name for p in repo.iterdir()) == sorted(expected)
    for model in [m for m in bench.OPEN_CLIP_MODELS if m in expected]:
        params = parameters(load_config(repo, model))
        assert params["model_name"] == "ViT-B-32" and params["pretrained"] == ""
        if model.endswith("encoder"):
            assert params["allow_random_init"] == "true"
    fusion = parameters(load_config(repo, "fusion"))
    assert fusion["strategy"] == "late" and fusion["head_dir"] == ""
    assert "SCORE" not in [o.name for o in load_config(repo, "fuse_image_text").output]
    for model, tuning in bench.PROFILES[profile].items():
        if merged and model == "image_preprocess":
            # Folded into the encoder: its parameters and its reasons are there.
            text = (repo / "image_encoder" / "config.pbtxt").read_text()
            assert "decoding (image_preprocess folded in): " + tuning.why.split()[0] in text
            encoder = parameters(load_config(repo, "image_encoder"))
            assert encoder["decode_images"] == "true"
            assert all(encoder[key] == value for key, value in tuning.params.items())
            assert [t.name for t in load_config(repo, "image_encoder").input] == ["IMAGE"]
            continue
        config = load_config(repo, model)
        text = (repo / model / "config.pbtxt").read_text()
        assert text.startswith(f"# mmfuse profile '{profile}' for {model}:")
        assert tuning.why and tuning.why.split()[0] in text  # the reason is written beside the settings
        assert config.instance_group[0].count == tuning.count
        assert list(config.dynamic_batching.preferred_batch_size) == list(tuning.preferred)
        assert config.dynamic_batching.max_queue_delay_microseconds == tuning.delay_us
        assert config.dynamic_batching.default_queue_policy.max_queue_size > 0  # the bounded queue is kept
        for key, value in tuning.params.items():
            assert parameters(config)[key] == value


@pytest.mark.parametrize("profile", sorted(bench.PROFILES))
def test_profile_parameters_are_known_to_the_handlers(open_clip_tiny, profile):
    """Every parameter a profile sets is read by its handler (a typo would fail the model's load)."""
    from mmfuse.serving.handler import resolve

    for model, tuning in bench.PROFILES[profile].items():
        raw = {"model_name": TINY, "pretrained": "", **tuning.params}
        if model.endswith("encoder"):
            raw.update(allow_random_init="true", seed="0")
        params = Params(model, raw)
        kind = "GPU" if tuning.kind == "KIND_GPU" else "CPU"
        context = ModelContext(model, model_dir=None, instance_kind=kind)
        config = resolve(model).parse(context, params)  # the handler's own parsing; builds nothing
        params.reject_unknown()
        if kind == "CPU":  # no GPU here: a GPU instance's config is parsed, not built
            resolve(model).build(context, config).close()


def test_cpu_profile_serves_precision_auto_single_threaded():
    from mmfuse.serving.hardware import resolve_precision

    cpu = bench.PROFILES["cpu"]
    for encoder in ("image_encoder", "text_encoder"):
        assert cpu[encoder].params["precision"] == "auto" and cpu[encoder].params["torch_threads"] == "1"
    gpu = bench.PROFILES["gpu"]
    assert gpu["image_encoder"].kind == gpu["text_encoder"].kind == "KIND_GPU"
    assert gpu["image_encoder"].params["precision"] == "fp16"
    assert bench.serving_precision("cpu") == resolve_precision("auto") and bench.serving_precision("baseline") == "fp32"


def _fake_result() -> dict:
    row = {"items_per_s": 50.0, "p50_ms": 100.0, "p95_ms": 120.0, "p99_ms": 130.0,
           "models": {"image_preprocess": {"compute_infer_ms": 5.0}, "image_encoder": {"compute_infer_ms": 50.0}}}
    at_load = {"load_fraction": 0.7, "items_per_s_offered": 35.0, "requests": 500, "p50_ms": 100.0, "p95_ms": 120.0, "p99_ms": 140.0,
               "p99_over_p50": 1.4, "fusion_ms": 1.0, "fusion_share_of_p50": 0.01,
               "models": {"fusion": {"requests": 10, "queue_ms": 0.1, "compute_input_ms": 0.1, "compute_infer_ms": 0.5,
                                     "compute_output_ms": 0.1, "compute_ms": 0.7, "mean_batch_rows": 4.0}}}
    return {
        "options": {"model": "ViT-B-32", "profile": "cpu", "plan": {"concurrency": 8, "rows": 4, "duration_s": 20,
                                                                   "warmup_s": 5}},
        "machine": {"cpu": "x", "cores": 2, "bf16_matrix_units": True, "host": "h", "time_utc": "t"},
        "load_average_start": [1.0], "load_average_end": [1.0], "seconds": 1.0,
        "peak": {"fp32": {"peak_gflops": 200.0, "all_threads_gflops": 200.0, "one_thread_gflops": 100.0},
                 "bf16": {"peak_gflops": 800.0, "all_threads_gflops": 800.0, "one_thread_gflops": 400.0}},
        "flops": {"image_flops": 8e9, "image_flops_counted": 7.9e9, "text_flops": 1e9, "text_tokens": 14,
                  "text_flops_padded": 6e9, "context_length": 77},
        "limit": {"dtype": "bf16", "why": "w", "peak_gflops": 800.0, "embed_image_per_s": 100.0,
                  "embed_text_per_s": 800.0, "fuse_image_text_per_s": 800 / 9},
        "naive": {"embed_image_per_s": 5.0, "embed_text_per_s": 20.0, "fuse_image_text_per_s": 4.0, "items": 3,
                  "default_threads": 2, "embed_image_per_s_by_threads": {"2": 5.0, "1": 4.0}},
        "served": {"embed_image": row, "fuse_image_text": dict(row, items_per_s=40.0), "fuse_image_text_at_load": at_load,
                   "outputs": {"served_precision": "bf16", "image_min_cosine_vs_fp32_in_process": 0.995,
                               "text_min_cosine_vs_fp32_in_process": 0.998}},
        "precision": {"batch": 16, "threads": 1, "device": "cpu",
                      "bf16": {"image_per_s": 40.0, "image_min_cosine_vs_fp32": 0.9999, "text_per_s": 300.0,
                               "text_min_cosine_vs_fp32": 0.9999},
                      "fp32": {"image_per_s": 10.0, "image_min_cosine_vs_fp32": 1.0, "text_per_s": 100.0,
                               "text_min_cosine_vs_fp32": 1.0},
                      "bf16_image_speedup": 4.0, "bf16_text_speedup": 3.0},
        "preprocessing": {"image_size": [640, 480], "encoded_kb": 100.0, "exact_vs_open_clip_max_abs": 0.0,
                          "draft_vs_exact_mean_abs": 0.02, "draft_vs_exact_max_abs": 0.1,
                          "draft_vs_exact_embedding_min_cosine": 0.9999,
                          "handler_images_per_s_by_decode_threads": {"1": 200.0},
                          "per_image": {"decode_ms": 1.0, "resize_crop_ms": 2.0, "to_tensor_normalize_ms": 0.2,
                                        "lookup_table_tail_ms": 0.1, "open_clip_transform_path_ms": 5.2,
                                        "exact_path_ms": 5.0, "jpeg_draft_path_ms": 2.5}},
        "served_jpeg_draft": True,
        "ceiling_measured": {"workers": 2, "batch": 8, "engine": "openvino", "precision": "bf16", "jpeg_draft": True,
                             "seconds": 8.0, "per_worker_per_s": [31.0, 29.0], "embed_image_per_s": 60.0},
        "text_trimming": {"speedup": 4.0, "trimmed_vs_padded": {"fp32": {"max_abs_diff": 1e-7}}, "precision": "bf16",
                          "batch": 64, "mean_tokens": 9.0, "longest_tokens": 14, "context_length": 77,
                          "trimmed_per_s": 400.0, "padded_per_s": 100.0},
    }


def test_summary_ratios_and_table():
    result = _fake_result()
    result["summary"] = s = bench.summarise(result)
    assert s["embed_image"]["served_over_limit"] == pytest.approx(0.5)
    assert s["embed_image"]["served_over_naive"] == pytest.approx(10.0)
    assert s["fuse_image_text"]["served_over_limit"] == pytest.approx(40 / (800 / 9))
    assert s["at_load"]["fusion_share_of_p50"] == 0.01 and s["text_trim_speedup"] == 4.0
    assert s["served_min_cosine_vs_fp32"] == 0.995
    # The ceiling: 25 ms of tower (40 img/s on one thread) + 2.5 ms of draft decoding per image, on 2 cores.
    c = s["ceiling"]
    assert c["embed_image_per_s"] == pytest.approx(2 * 1000 / 27.5) and c["jpeg_draft"]
    assert c["embed_image_over_limit"] == pytest.approx(2 * 1000 / 27.5 / 100.0)
    assert c["tower_over_one_thread_peak"] == pytest.approx(40 * 8 / 400)
    text = bench.table(result)
    for fragment in ("| peak matmul bf16 | 800 GFLOP/s", "| embed_image | 50.0 | 100.0 | 0.50 | 5.0 | 10.0x |",
                     "p99/p50 1.40", "1.0% of p50", "4.0x", "served/limit", "served/naive", "500 requests measured",
                     "= 72.7 img/s on 2 cores = 0.73 of the limit",
                     "no server: 60.0 img/s = 0.60 of the limit; served embed_image = 0.83 of it"):
        assert fragment in text, fragment
    assert s["ceiling_measured"]["served_over_ceiling"] == pytest.approx(50 / 60)


def test_json_has_no_nan(tmp_path):
    out = tmp_path / "b.json"
    bench.write_json({"a": math.nan, "b": [np.float32(1.5), math.inf], "c": {"d": np.int64(3)}}, out)
    import json

    assert json.loads(out.read_text()) == {"a": None, "b": [1.5, None], "c": {"d": 3}}


def test_statistics_delta():
    """The bench reports Triton's statistics through mmfuse.triton_stats: milliseconds per request, rows per batch."""
    from mmfuse import triton_stats

    def snapshot(inferences, executions, requests, success_ns, queue_ns, infer_ns):
        phases = {"success": (requests, success_ns), "queue": (requests, queue_ns), "compute_input": (requests, 0),
                  "compute_infer": (requests, infer_ns), "compute_output": (requests, 0)}
        return {"m": {"inference_count": inferences, "execution_count": executions,
                      "inference_stats": {k: {"count": c, "ns": ns} for k, (c, ns) in phases.items()}}}

    before = snapshot(10, 5, 10, 1e7, 0, 0)
    after = snapshot(30, 7, 20, 3e7, 2e7, 5e6)
    d = triton_stats.delta(before, after)["m"]
    assert d["requests"] == 10 and d["request_ms"] == pytest.approx(2.0) and d["queue_ms"] == pytest.approx(2.0)
    assert d["compute_infer_ms"] == pytest.approx(0.5) and d["mean_batch_rows"] == pytest.approx(10.0)
    assert triton_stats.delta(after, after) == {}  # idle models are left out unless named


def test_the_ceiling_follows_the_served_engine():
    result = _fake_result()
    result["precision"]["bf16"]["image_openvino_per_s"] = 50.0
    result["precision"]["bf16"]["image_openvino_min_cosine_vs_fp32"] = 0.9999
    torch_ceiling = bench.serving_ceiling(result)
    result["served_engine"] = "openvino"
    c = bench.serving_ceiling(result)
    assert c["engine"] == "openvino" and torch_ceiling["engine"] == "torch"
    assert c["embed_image_per_s"] == pytest.approx(2 * 1000 / (20.0 + 2.5))  # 50 img/s = 20 ms, + 2.5 ms decoding
    result["summary"] = bench.summarise(result)
    assert "image tower (openvino) 20.0 ms" in bench.table(result)
    assert "engine openvino: image 50.0/s" in bench.table(result)
    result["precision"]["bf16"].update(text_openvino_per_s=330.0, text_openvino_min_cosine_vs_fp32=0.9998)
    assert "engine openvino: image 50.0/s, cosine vs torch fp32 >= 0.9999; text 330/s, cosine >= 0.9998)" in \
        bench.table(result)


def test_measured_ceiling_runs_every_worker_at_once(open_clip_tiny):
    """Real processes, real handlers (tiny model): one rate per worker, their sum the ceiling."""
    images, _ = bench.bench_inputs(2, 96, 72)
    c = bench.measured_ceiling(TINY, "fp32", "torch", True, images, seconds=0.3, batch=2, workers=2)
    assert len(c["per_worker_per_s"]) == 2 and all(rate > 0 for rate in c["per_worker_per_s"])
    assert c["embed_image_per_s"] == pytest.approx(sum(c["per_worker_per_s"]))


def test_a_failing_ceiling_worker_is_reported_not_hung(open_clip_tiny):
    images, _ = bench.bench_inputs(1, 96, 72)
    with pytest.raises(RuntimeError, match="measured ceiling"):
        bench.measured_ceiling("no-such-model", "fp32", "torch", False, images, seconds=0.1, workers=2)


def _with_targets(result: dict, cls: str = "cpu-avx2", cores: int = 2) -> dict:
    """The fake result as an ``auto`` run with the hand-picked profiles, the latency runs and a hardware class."""
    result["options"]["profile"] = "auto"
    result["hardware"] = {"class": cls, "cpu": "x", "cores": cores, "flags": ["avx2"], "gpus": []}
    result["auto"] = {"throughput": {"base_profile": "cpu", "decoding": "in_encoder",
                                     "encoders": {"image_encoder": {"instances": 2, "torch_threads": "1",
                                                                    "engine": "openvino", "precision": "fp32"}}}}
    result["served"]["embed_text"] = dict(result["served"]["embed_image"], items_per_s=120.0)
    result["served"]["embed_image_c1"] = {"items_per_s": 9.0, "p50_ms": 110.0, "p99_ms": 130.0}
    result["compare"] = {"baseline": {"embed_image": {"items_per_s": 20.0}, "embed_text": {"items_per_s": 50.0}},
                         "cpu": {"embed_image": {"items_per_s": 51.0}, "embed_text": {"items_per_s": 100.0}}}
    result["served_latency"] = {"embed_image_c1": {"items_per_s": 10.0, "p50_ms": 100.0, "p99_ms": 120.0}}
    result["single_image"] = {"p50_ms": 90.0, "engine": "openvino", "precision": "fp32", "threads": 2}
    return result


def test_every_target_has_its_figure_and_verdict():
    result = _with_targets(_fake_result())
    result["peak"]["fp32"]["peak_gflops"] = 130.0  # within 25 % of the other servers' machine (126 GFLOP/s)
    result["summary"] = s = bench.summarise(result)
    t = {row["target"]: row for row in s["targets"]}
    image = t["auto vs the best hand-picked profile, embed_image"]
    assert image["ratio"] == pytest.approx(50 / 51) and image["met"] is True and "cpu 51.0" in image["detail"]
    text = t["auto vs the best hand-picked profile, embed_text"]
    assert text["ratio"] == pytest.approx(1.2) and text["met"] is True
    ceiling = t["served embed_image / in-process ceiling"]
    assert ceiling["ratio"] == pytest.approx(50 / 60) and ceiling["met"] is False  # 0.83 < 0.9
    other = t["embed_image vs the best other server"]  # the same kind of machine as the reference: decided
    assert other["ratio"] == pytest.approx(50 / 8.9) and other["met"] is True and "infinity-emb" in other["detail"]
    assert t["embed_text vs the best other server"]["ratio"] == pytest.approx(120 / 55.8)
    latency = t["embed_image p50 at concurrency 1 / in-process single image"]
    assert latency["ratio"] == pytest.approx(100 / 90) and latency["met"] is True  # the auto-latency server's p50
    assert s["concurrency_1"]["embed_image"]["p50_ms"] == 110.0
    result["machine"]["emulation"] = {"MMFUSE_CPU_FLAGS": "avx2 fma", "ONEDNN_MAX_CPU_ISA": "AVX2"}
    result["summary"] = s = bench.summarise(result)
    other = {row["target"]: row for row in s["targets"]}["embed_image vs the best other server"]
    assert other["met"] is None and "emulates" in other["detail"]  # an emulated class decides nothing
    assert other["scaled_ratio"] == pytest.approx(50 * 126 / 130 / 8.9)
    text_out = bench.table(result)
    for fragment in ("hardware class: cpu-avx2", "EMULATED class: MMFUSE_CPU_FLAGS=avx2 fma, ONEDNN_MAX_CPU_ISA=AVX2",
                     "auto chose: profile 'cpu' adapted, decoding in_encoder",
                     "| target | wanted | measured | met | how |",
                     "| served embed_image / in-process ceiling | >= 0.90 | 0.83 | NO |",
                     "| baseline | 20.0 | 50.0 |", "single requests (concurrency 1, one row each"):
        assert fragment in text_out, fragment


def test_targets_that_this_run_cannot_decide_say_why():
    result = _with_targets(_fake_result(), cls="cpu-amx")  # not the kind of machine the other servers ran on
    del result["served_latency"]
    result["compare"] = {}
    t = {row["target"]: row for row in bench.summarise(result)["targets"]}
    other = t["embed_image vs the best other server"]
    assert other["met"] is None and other["ratio"] == pytest.approx(50 / 8.9) and "orientation only" in other["detail"]
    assert t["auto vs the best hand-picked profile, embed_image"]["met"] is None
    assert "no hand-picked profile" in t["auto vs the best hand-picked profile, embed_image"]["detail"]
    assert t["embed_image p50 at concurrency 1 / in-process single image"]["met"] is None
    result = _with_targets(_fake_result())  # the class and cores of that machine, twice its fp32 peak
    result["peak"]["fp32"]["peak_gflops"] = 252.0
    other = {row["target"]: row for row in bench.summarise(result)["targets"]}["embed_text vs the best other server"]
    assert other["met"] is None and "fp32 peak is 252 GFLOP/s against that machine's 126" in other["detail"]
    assert other["scaled_ratio"] == pytest.approx(120 / 2 / 55.8) and "60.0 items/s = 1.08x" in other["detail"]
    result["options"]["profile"] = "cpu"  # a hand-picked profile is not held to the auto target
    t = {row["target"]: row for row in bench.summarise(result)["targets"]}
    assert "--profile is not auto" in t["auto vs the best hand-picked profile, embed_text"]["detail"]


def test_the_compared_profiles():
    from mmfuse.bench.run import compared_profiles

    assert compared_profiles(bench.BenchOptions()) == ["baseline", "cpu", "latency"]
    assert compared_profiles(bench.BenchOptions(profile="cpu")) == ["baseline", "latency"]
    assert compared_profiles(bench.BenchOptions(device="cuda")) == ["baseline", "gpu"]
    assert compared_profiles(bench.BenchOptions(compare=())) == []
    assert compared_profiles(bench.BenchOptions(compare=("cpu",), baseline=True)) == ["baseline", "cpu"]


def test_bench_command_line(capsys):
    import argparse

    from mmfuse.commands import bench as command

    parser = argparse.ArgumentParser()
    command.register(parser.add_subparsers())
    args = parser.parse_args(["bench"])
    assert args.profile == "auto" and args.compare is None and args.latency and args.precision is None
    args = parser.parse_args(["bench", "--compare", "none", "--no-latency", "--precision", "int8"])
    assert args.compare == () and not args.latency and args.precision == "int8"
    assert parser.parse_args(["bench", "--compare", "cpu, baseline"]).compare == ("cpu", "baseline")
    for bad in ("auto", "fast"):
        with pytest.raises(SystemExit):
            parser.parse_args(["bench", "--compare", bad])
        assert "not a hand-picked profile" in capsys.readouterr().err
