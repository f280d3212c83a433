"""The limit: the machine's peak matrix-multiply rate and the encoders' FLOPs per item (``limit = peak / FLOPs``)."""
from __future__ import annotations

import math
import os
import platform
import time
from typing import Any

from .inputs import timed


# -- machine ---------------------------------------------------------------------------------------------------------
def machine_info() -> dict[str, Any]:
    import torch

    from ..serving import hardware

    cpu, flags = hardware.cpu_model_and_flags()
    model = platform.processor() or platform.machine()
    if cpu and model in ("", platform.machine(), platform.processor()):
        model = cpu
    info = {
        "cpu": model, "cores": os.cpu_count(), "usable_cores": hardware.usable_cores(), "machine": platform.machine(),
        "flags": [f for f in hardware.REPORTED_FLAGS if f in flags], "cpu_class": hardware.cpu_class(flags),
        "bf16_matrix_units": hardware.has_bf16_units(flags), "emulation": hardware.emulation(),
        "torch": torch.__version__, "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "python": platform.python_version(), "host": platform.node(),
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


# -- the limit: peak matmul and FLOPs per item ---------------------------------------------------------------------
def matmul_rate(dtype: str, size: int, threads: int | None = None, seconds: float = 1.0, device: str = "cpu",
                min_reps: int = 3) -> float:
    """Best GFLOP/s of ``size``-square matrix products (2*n^3 FLOPs each) within ``seconds``."""
    import torch

    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        dt = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
        gen = torch.Generator().manual_seed(0)
        a = torch.randn(size, size, generator=gen).to(device, dt)
        b = torch.randn(size, size, generator=gen).to(device, dt)
        sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
        for _ in range(2):
            a @ b
        sync()
        best, reps, started = math.inf, 0, time.perf_counter()
        while reps < min_reps or time.perf_counter() - started < seconds:
            t = time.perf_counter()
            a @ b
            sync()
            best = min(best, time.perf_counter() - t)
            reps += 1
            if time.perf_counter() - started > 4 * seconds:
                break
        return 2.0 * size ** 3 / best / 1e9
    finally:
        torch.set_num_threads(previous)


def machine_peak(quick: bool = False, device: str = "cpu", bf16_units: bool = True) -> dict[str, Any]:
    """Peak matmul GFLOP/s per dtype: the best of all threads in one process and of one thread times the
    number of cores (the serving processes each run one thread). The larger is the limit: conservative.
    Without bf16 units (``bf16_units`` False) bf16 is emulated, ~100x slower: measured once, small, and marked."""
    cores = os.cpu_count() or 1
    sizes = (512,) if quick else (1024, 2048)
    seconds = 0.2 if quick else 1.0
    out: dict[str, Any] = {}
    dtypes = ("fp32", "bf16") if device == "cpu" else ("fp32", "bf16", "fp16")
    for dtype in dtypes:
        if device != "cpu":
            rate = max(matmul_rate(dtype, s, seconds=seconds, device=device) for s in ((2048,) if quick else (4096, 8192)))
            out[dtype] = {"gflops": rate, "peak_gflops": rate}
            continue
        emulated = dtype == "bf16" and not bf16_units
        kind = dict(sizes=(256,), min_reps=1) if emulated else dict(sizes=sizes, min_reps=3)
        all_threads = max(matmul_rate(dtype, s, threads=cores, seconds=seconds, min_reps=kind["min_reps"])
                          for s in kind["sizes"])
        one_thread = max(matmul_rate(dtype, s, threads=1, seconds=seconds, min_reps=kind["min_reps"])
                         for s in kind["sizes"])
        out[dtype] = {"all_threads_gflops": all_threads, "one_thread_gflops": one_thread,
                      "per_core_times_cores_gflops": one_thread * cores,
                      "peak_gflops": max(all_threads, one_thread * cores), "emulated": emulated}
    return out


def tower_gemm_rate(model_name: str, dtype: str, batch: int, threads: int = 1, seconds: float = 1.0,
                    device: str = "cpu") -> dict[str, Any] | None:
    """GFLOP/s of the image tower's own matrix products (qkv, out, MLP up and down at M = batch x tokens),
    as F.linear runs them: what the tower could reach if nothing but its matmuls took time."""
    import torch
    import torch.nn.functional as F

    from mmfuse.serving.openclip_models import ClipSpec

    vision = ClipSpec(model_name, allow_random_init=True).model_config()["vision_cfg"]
    if vit_flops(vision, 1) is None:
        return None
    size = vision.get("image_size", 224)
    size = size if isinstance(size, int) else size[0]
    tokens = (size // vision.get("patch_size", 16)) ** 2 + 1
    width = vision["width"]
    mlp = int(width * vision.get("mlp_ratio", 4.0))
    dt = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        gen = torch.Generator().manual_seed(0)
        x = {k: torch.randn(batch * tokens, k, generator=gen).to(device, dt) for k in (width, mlp)}
        shapes = [(width, 3 * width), (width, width), (width, mlp), (mlp, width)]
        weights = [torch.randn(n, k, generator=gen).to(device, dt) for k, n in shapes]
        total_flops, total_s = 0.0, 0.0
        for (k, n), w in zip(shapes, weights):
            with torch.inference_mode():
                per = timed(lambda a=x[k], w=w: F.linear(a, w), seconds / 4, min_reps=3)
            total_flops += 2.0 * batch * tokens * k * n
            total_s += per
        return {"dtype": dtype, "batch": batch, "tokens": tokens, "threads": threads,
                "gflops": total_flops / total_s / 1e9}
    finally:
        torch.set_num_threads(previous)



def vit_flops(vision_cfg: dict[str, Any], embed_dim: int) -> float | None:
    """Analytic matmul FLOPs of one image through a plain open_clip ViT tower (None for other towers)."""
    if any(k in vision_cfg for k in ("timm_model_name", "layers_per_stage")) or isinstance(vision_cfg.get("layers"), (list, tuple)):
        return None
    size, patch, width, layers = (vision_cfg.get("image_size", 224), vision_cfg.get("patch_size", 16),
                                  vision_cfg["width"], vision_cfg["layers"])
    size = size if isinstance(size, int) else size[0]
    grid = (size // patch) ** 2
    tokens = grid + 1
    mlp = int(width * vision_cfg.get("mlp_ratio", 4.0))
    per_layer = 2 * tokens * width * (3 * width + width + 2 * mlp) + 2 * 2 * tokens * tokens * width
    return float(2 * grid * 3 * patch * patch * width + layers * per_layer + 2 * width * embed_dim)


def text_flops(text_cfg: dict[str, Any], embed_dim: int, tokens: int) -> float:
    """Analytic matmul FLOPs of one caption of ``tokens`` tokens through open_clip's text transformer."""
    width, layers = text_cfg["width"], text_cfg["layers"]
    mlp = int(width * text_cfg.get("mlp_ratio", 4.0))
    per_layer = 2 * tokens * width * (3 * width + width + 2 * mlp) + 2 * 2 * tokens * tokens * width
    return float(layers * per_layer + 2 * width * embed_dim)


def counted_flops(model_name: str, text_tokens: int) -> dict[str, float]:
    """FLOPs per item counted by torch.utils.flop_counter (MHA fast path off: its fused kernel is not counted)."""
    import open_clip
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from mmfuse.serving.encoders import encode_text
    from mmfuse.serving.openclip_models import register_model_configs

    register_model_configs()
    model = open_clip.create_model(model_name, pretrained=None).eval()
    size = model.visual.image_size
    size = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
    fast = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with torch.no_grad():
            with FlopCounterMode(display=False) as image:
                model.encode_image(torch.zeros((1, 3) + size))
            text = torch.zeros((1, text_tokens), dtype=torch.long)
            text[0, text_tokens - 1] = 1  # the end-of-text position (argmax) is the last token
            with FlopCounterMode(display=False) as counted_text:
                encode_text(model, text, trim=True)
    finally:
        torch.backends.mha.set_fastpath_enabled(fast)
    return {"image": float(image.get_total_flops()), "text": float(counted_text.get_total_flops())}


def model_flops(model_name: str, text_tokens: int, context_length: int) -> dict[str, Any]:
    from mmfuse.serving.openclip_models import ClipSpec

    cfg = ClipSpec(model_name, allow_random_init=True).model_config()
    counted = counted_flops(model_name, text_tokens)
    image = vit_flops(cfg["vision_cfg"], cfg["embed_dim"])
    text = text_flops(cfg["text_cfg"], cfg["embed_dim"], text_tokens)
    # The analytic count includes the attention products (QK^T, AV), which the flop counter misses on the
    # CPU's attention kernel; it is used where the tower is a plain transformer, the counted figure otherwise.
    return {
        "image_flops": image if image is not None else counted["image"],
        "image_flops_counted": counted["image"],
        "image_flops_analytic": image,
        "text_flops": text if "hf_model_name" not in cfg["text_cfg"] else counted["text"],
        "text_flops_counted": counted["text"],
        "text_flops_analytic": text,
        "text_tokens": text_tokens,
        "text_flops_padded": text_flops(cfg["text_cfg"], cfg["embed_dim"], context_length),
        "context_length": context_length,
    }


