"""The whole run of ``mmfuse bench``: every measurement, in order, in one process (``run_bench``)."""
from __future__ import annotations

import gc
import json
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .. import auto
from ..processes import load_average
from ..profiles import load_profile
from . import inprocess
from .inputs import bench_inputs
from .limit import machine_info, machine_peak, model_flops, tower_gemm_rate
from .report import jsonable, summarise, table, write_json
from .served import OPEN_CLIP_MODELS, ServedPlan, build_repository, served, serving_precision

#: The profiles a person would pick by hand, per device: ``auto`` is held to the best of them (served alone,
#: same load, same run).
HAND_PICKED = {"cpu": ("baseline", "cpu", "latency"), "cuda": ("baseline", "gpu")}


@dataclass
class BenchOptions:
    model: str = "ViT-B-32"
    profile: str = "auto"
    precision: str | None = None  # replaces the profile's encoders' precision (fp32, bf16, fp16, int8, auto)
    quick: bool = False
    baseline: bool = False  # serve the baseline too (it is among the compared profiles unless compare says not)
    compare: tuple[str, ...] | None = None  # hand-picked profiles served beside it; None: HAND_PICKED[device]
    latency: bool = True  # concurrency-1 runs, the auto-latency settings, one image in-process on every core
    images: int = 16
    image_size: tuple[int, int] = (640, 480)
    plan: ServedPlan = field(default_factory=ServedPlan)
    naive_items: int = 24
    seconds: float = 4.0  # per in-process measurement
    jpeg_draft: bool | None = None  # None: the profile's setting
    device: str = "cpu"
    served: bool = True

    @classmethod
    def quick_options(cls, **overrides) -> BenchOptions:
        plan = ServedPlan(rows=2, concurrency=4, warmup_s=1.0, duration_s=3.0, text_duration_s=2.0, max_requests=400,
                          at_load_min_requests=0)
        return cls(**{"quick": True, "images": 4, "image_size": (320, 240), "plan": plan, "naive_items": 3,
                      "seconds": 0.5, **overrides})


def run_bench(options: BenchOptions, progress: Callable[[str], None] = print) -> dict[str, Any]:
    """Every measurement, in order, in one run. Returns the JSON-able result (see ``table``)."""
    import torch

    from mmfuse.serving.openclip_models import ClipSpec, load_tokenizer, register_model_configs

    register_model_configs()
    started = time.perf_counter()
    result: dict[str, Any] = {"options": jsonable(asdict(options)), "machine": machine_info(),
                              "load_average_start": load_average()}
    hw = auto.detect()
    asked = options.precision if options.profile in auto.VIRTUAL else None  # a hand-picked profile's is not auto's
    choices = {goal: auto.choose(hw, goal, asked) for goal in auto.GOALS}
    result["hardware"] = hw.as_dict()
    result["auto"] = {goal: choice.summary() for goal, choice in choices.items()}
    for line in choices["throughput"].lines() + choices["latency"].lines()[1:]:
        progress(line)
    cpu = options.device == "cpu"
    images, captions = bench_inputs(options.images, *options.image_size)
    tokens = load_tokenizer(ClipSpec(options.model))(captions).numpy()
    longest = int((tokens.argmax(axis=1) + 1).max())
    progress("peak matrix-multiply rate ...")
    result["peak"] = machine_peak(options.quick, options.device, result["machine"]["bf16_matrix_units"])
    progress("FLOPs per item ...")
    result["flops"] = model_flops(options.model, longest, int(tokens.shape[1]))
    precision = serving_precision(options.profile, options.device, options.precision)
    result["served_precision"] = precision
    limit_dtype = ("bf16" if result["machine"]["bf16_matrix_units"] and precision in ("bf16", "int8") else "fp32") \
        if cpu else ("fp16" if precision == "fp16" else "fp32")
    peak = result["peak"][limit_dtype]["peak_gflops"] * 1e9
    flops = result["flops"]
    result["limit"] = {
        "dtype": limit_dtype, "peak_gflops": peak / 1e9,
        "embed_image_per_s": peak / flops["image_flops"],
        "embed_text_per_s": peak / flops["text_flops"],
        "fuse_image_text_per_s": peak / (flops["image_flops"] + flops["text_flops"]),
        "why": ("bf16 peak: the CPU has bf16 matrix units and the profile serves bf16" if limit_dtype == "bf16"
                else f"{limit_dtype} peak"),
    }
    if precision == "int8":
        result["limit"]["why"] = (f"{limit_dtype} peak: int8 is served, and no int8 matmul peak is measured (int8 "
                                  "can pass this limit)")
    if not result["machine"]["bf16_matrix_units"] and cpu and precision != "int8":
        result["limit"]["why"] = "fp32 peak: no bf16 matrix units (AMX / AVX512-BF16) on this CPU"
    if cpu:
        progress("the image tower's own matrix products ...")
        result["tower_gemm"] = tower_gemm_rate(options.model, precision, batch=4 if options.quick else 8,
                                               seconds=options.seconds / 2)
        result["encoder_steps"] = inprocess.encoder_steps(options.model, precision, batch=4 if options.quick else 8,
                                                          seconds=options.seconds)
    gc.collect()  # the models of the step before: one at a time on a small machine
    progress("naive in-process loop (open_clip fp32, one item at a time) ...")
    result["naive"] = inprocess.naive_loop(options.model, images, captions, options.naive_items) if cpu else None
    gc.collect()  # the models of the step before: one at a time on a small machine
    progress("image decoding and resizing ...")
    result["preprocessing"] = inprocess.preprocessing(options.model, images, options.seconds)
    gc.collect()  # the models of the step before: one at a time on a small machine
    progress("text: trimmed vs padded ...")
    result["text_trimming"] = inprocess.text_trimming(options.model, captions, precision, options.seconds,
                                                      batch=16 if options.quick else 64,
                                                      device=_torch_device(options.device))
    gc.collect()  # the models of the step before: one at a time on a small machine
    progress("precision ...")
    precisions = (("fp32", "bf16") if cpu else ("fp32", "fp16", "bf16")) + (("int8",) if precision == "int8" else ())
    batch = 4 if options.quick else (16 if cpu else 64)
    result["precision"] = inprocess.precision_cost(options.model, images, captions, precisions, options.seconds,
                                                   batch=batch, device=_torch_device(options.device),
                                                   bf16_units=result["machine"]["bf16_matrix_units"] or not cpu)
    if not cpu:
        progress(f"encoders built from profile {options.profile!r} as Triton builds them ...")
        result["profile_handlers"] = inprocess.profile_handlers(options.model, options.profile, images, captions,
                                                                batch, options.seconds / 2)
    gc.collect()
    # What the profile serves (the served run reads them back from its generated repository).
    draft, engine = _decoding_and_engine(options.profile, options.precision, options.jpeg_draft)
    result["served_jpeg_draft"], result["served_engine"] = draft, engine
    if cpu:
        progress(f"ceiling: decoding + image tower ({engine}, {precision}) on every core, no serving ...")
        try:
            result["ceiling_measured"] = inprocess.measured_ceiling(options.model, precision, engine, draft, images,
                                                                    seconds=2 * options.seconds,
                                                                    batch=4 if options.quick else 8)
        except RuntimeError as error:
            progress(f"  not measured: {error}")
        gc.collect()
    latency_profile = "auto-latency"
    if cpu and options.latency:
        lat_precision = serving_precision(latency_profile, options.device, options.precision)
        lat_draft, lat_engine = _decoding_and_engine(latency_profile, options.precision, options.jpeg_draft)
        progress(f"one image at a time, in-process, {hw.cores} thread(s) ({lat_engine}, {lat_precision}) ...")
        result["single_image"] = inprocess.single_image(options.model, lat_precision, lat_engine, lat_draft, images,
                                                        threads=hw.cores, reps=8 if options.quick else 20)
        gc.collect()
    if options.served:
        with tempfile.TemporaryDirectory(prefix="mmfuse-bench-") as tmp:
            tmp = Path(tmp)
            extra = (None if options.jpeg_draft is None
                     else {"image_preprocess": {"jpeg_draft": "true" if options.jpeg_draft else "false"}})
            single = ("embed_image", "embed_text") if options.latency else ()
            progress(f"served: profile {options.profile!r} ...")
            repo = build_repository(tmp / options.profile, options.model, options.profile, extra_params=extra,
                                    precision=options.precision)
            result["configs"] = {m: (repo / m / "config.pbtxt").read_text() for m in OPEN_CLIP_MODELS + ("fuse_image_text",)
                                 if (repo / m / "config.pbtxt").is_file()}
            result["served"] = served(repo, options.model, images, captions, options.plan, tmp / "logs", precision,
                                      single=single)
            result["compare"] = {}
            for name in compared_profiles(options):
                progress(f"served: hand-picked profile {name!r}, alone, the same load ...")
                repo = build_repository(tmp / name, options.model, name, extra_params=extra)
                ensembles = ("embed_image", "embed_text") + (("fuse_image_text",) if name == "baseline" else ())
                result["compare"][name] = served(repo, options.model, images, captions, options.plan,
                                                 tmp / f"logs-{name}", serving_precision(name, options.device),
                                                 ensembles=ensembles, fixed_rate=False, check_outputs=False)
            if "baseline" in result["compare"]:
                result["served_baseline"] = result["compare"]["baseline"]
            if options.latency and options.profile != latency_profile and not hw.gpus:
                progress(f"served: profile {latency_profile!r}, one request of one row at a time ...")
                repo = build_repository(tmp / latency_profile, options.model, latency_profile, extra_params=extra,
                                        precision=options.precision)
                result["served_latency"] = served(repo, options.model, images, captions, options.plan,
                                                  tmp / "logs-latency", lat_precision, ensembles=(), fixed_rate=False,
                                                  check_outputs=False, single=single)
        del torch
    result["summary"] = summarise(result)
    result["load_average_end"] = load_average()
    result["seconds"] = time.perf_counter() - started
    return result


def compared_profiles(options: BenchOptions) -> list[str]:
    """The hand-picked profiles served beside ``options.profile`` (not itself): ``options.compare``, or every
    hand-picked profile of the device when it is None; ``baseline`` too with ``options.baseline``."""
    names = list(HAND_PICKED["cpu" if options.device == "cpu" else "cuda"] if options.compare is None
                 else options.compare)
    if options.baseline and "baseline" not in names:
        names.insert(0, "baseline")
    return [n for n in dict.fromkeys(names) if n != options.profile]


def _decoding_and_engine(profile: str, precision: str | None, jpeg_draft: bool | None) -> tuple[bool, str]:
    """Whether ``profile`` decodes JPEGs at reduced size (``jpeg_draft`` overrides it) and its image encoder's engine."""
    models = load_profile(profile, precision).models
    draft = jpeg_draft
    if draft is None:
        draft = models["image_preprocess"].params.get("jpeg_draft", "false") == "true"
    return draft, models["image_encoder"].params.get("engine", "torch")


def _torch_device(device: str) -> str:
    return "cuda:0" if device in ("cuda", "gpu") else device


def main_gpu(argv: Sequence[str] | None = None) -> int:
    """``python -m mmfuse.bench --gpu OUT.json``: the in-process half on a GPU (no tritonserver needed)."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m mmfuse.bench")
    parser.add_argument("--gpu", required=True, help="JSON output path")
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    options = BenchOptions(model=args.model, profile="gpu", device="cuda", served=False, quick=args.quick,
                           seconds=2.0 if args.quick else 6.0)
    result = run_bench(options)
    write_json(result, Path(args.gpu))
    print(table(result))
    print(json.dumps(jsonable({k: result.get(k) for k in ("machine", "peak", "limit", "summary", "precision",
                                                            "text_trimming", "profile_handlers")}), indent=1))
    return 0
