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

from ..processes import load_average
from . import inprocess
from .inputs import bench_inputs
from .limit import machine_info, machine_peak, model_flops, tower_gemm_rate
from .report import jsonable, summarise, table, write_json
from .served import OPEN_CLIP_MODELS, PROFILES, ServedPlan, build_repository, served, serving_precision


@dataclass
class BenchOptions:
    model: str = "ViT-B-32"
    profile: str = "cpu"
    quick: bool = False
    baseline: bool = False
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
    cpu = options.device == "cpu"
    images, captions = bench_inputs(options.images, *options.image_size)
    tokens = load_tokenizer(ClipSpec(options.model))(captions).numpy()
    longest = int((tokens.argmax(axis=1) + 1).max())
    progress("peak matrix-multiply rate ...")
    result["peak"] = machine_peak(options.quick, options.device)
    progress("FLOPs per item ...")
    result["flops"] = model_flops(options.model, longest, int(tokens.shape[1]))
    precision = serving_precision(options.profile, options.device)
    result["served_precision"] = precision
    limit_dtype = ("bf16" if result["machine"]["bf16_matrix_units"] and precision == "bf16" else "fp32") if cpu \
        else ("fp16" if precision == "fp16" else "fp32")
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
    if not result["machine"]["bf16_matrix_units"] and cpu:
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
    precisions = ("fp32", "bf16") if cpu else ("fp32", "fp16", "bf16")
    batch = 4 if options.quick else (16 if cpu else 64)
    result["precision"] = inprocess.precision_cost(options.model, images, captions, precisions, options.seconds,
                                                   batch=batch, device=_torch_device(options.device))
    if not cpu:
        progress(f"encoders built from profile {options.profile!r} as Triton builds them ...")
        result["profile_handlers"] = inprocess.profile_handlers(options.model, options.profile, images, captions,
                                                                batch, options.seconds / 2)
    gc.collect()
    # What the profile serves (the served run reads them back from its generated repository).
    served_tuning = PROFILES[options.profile]
    draft = options.jpeg_draft
    if draft is None:
        draft = served_tuning["image_preprocess"].params.get("jpeg_draft", "false") == "true"
    engine = served_tuning["image_encoder"].params.get("engine", "torch")
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
    if options.served:
        with tempfile.TemporaryDirectory(prefix="mmfuse-bench-") as tmp:
            tmp = Path(tmp)
            extra = (None if options.jpeg_draft is None
                     else {"image_preprocess": {"jpeg_draft": "true" if options.jpeg_draft else "false"}})
            if options.baseline:
                progress("served: baseline (the shipped settings) ...")
                repo = build_repository(tmp / "baseline", options.model, "baseline")
                plan = ServedPlan(**{**asdict(options.plan), "duration_s": options.plan.duration_s / 2})
                result["served_baseline"] = served(repo, options.model, images, captions, plan, tmp / "logs-baseline",
                                                   "fp32", fixed_rate=False, check_outputs=False)
            progress(f"served: profile {options.profile!r} ...")
            repo = build_repository(tmp / options.profile, options.model, options.profile, extra_params=extra)
            result["configs"] = {m: (repo / m / "config.pbtxt").read_text() for m in OPEN_CLIP_MODELS + ("fuse_image_text",)
                                 if (repo / m / "config.pbtxt").is_file()}
            result["served"] = served(repo, options.model, images, captions, options.plan, tmp / "logs", precision)
        del torch
    result["summary"] = summarise(result)
    result["load_average_end"] = load_average()
    result["seconds"] = time.perf_counter() - started
    return result


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
