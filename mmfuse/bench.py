"""``mmfuse bench``: how close the serving path comes to the machine's compute limit, in one run.

Everything is measured in the same run, on the same machine and inputs, so that its ratios hold on
a shared machine where absolute figures move with the load:

* the limit: the machine's peak matrix-multiply rate (torch, fp32 and bf16, all threads and one
  thread per core) and the encoders' FLOPs per item (the analytic count of their matrix products,
  checked against torch.utils.flop_counter), so ``limit = peak / FLOPs per item``;
* a naive in-process loop: open_clip in fp32, one item at a time (torch's default threads and one
  thread: the faster is the reference);
* the preprocessing: decode, resize (open_clip's transform), the tensor tail, per image; the exact
  path against reduced-size JPEG decoding (``jpeg_draft``, which the cpu and gpu profiles serve), its
  pixel difference and what that does to the embedding (cosine);
* text trimming: the text tower on short captions, trimmed to the longest caption vs padded to the
  context length, and the largest difference between the two (fp32);
* precision: the towers in fp32 against the profile's precision (bf16 on a CPU, fp16 on a GPU):
  throughput and the cosine of the embeddings;
* served: a real tritonserver on a generated copy of the repository (the model switched to
  ``--model``, ViT-B-32 by default, random weights; the batching/instances/threads/precision of a
  *profile*), loaded over loopback gRPC: closed-loop throughput of embed_image, embed_text and
  fuse_image_text, then fuse_image_text at a fixed rate of 70 % of its peak for p50/p95/p99, and the
  fusion step's share of the end-to-end p50 from Triton's statistics API;
* the ceiling: the in-process image tower plus its image's decoding on every core, with no serving
  overhead at all: served/limit cannot pass it on this machine with these kernels. Computed from the
  one-thread figures above, and measured: one process per core, each decoding and encoding batches of
  the bench's images in a loop, all at once (the served path without Triton, gRPC or a client).

Profiles are data (mmfuse/profiles/*.json, one line of reason per setting; the figures that chose them
are in docs/performance.md); ``baseline`` is the shipped repository's settings (fp32, one instance of each
model, one thread) for the before/after figures.
"""
from __future__ import annotations

import asyncio
import gc
import io
import json
import math
import os
import platform
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from .profiles import Tuning, apply_profile, load_profile, profile_names

BENCH_MODELS = ("image_preprocess", "text_preprocess", "image_encoder", "text_encoder", "fusion",
                "embed_image", "embed_text", "fuse_image_text")
OPEN_CLIP_MODELS = ("image_preprocess", "text_preprocess", "image_encoder", "text_encoder")
ENSEMBLE_OUTPUTS = {
    "embed_image": ("EMBEDDING", "VALID", "STATUS"),
    "embed_text": ("EMBEDDING", "VALID", "STATUS"),
    "fuse_image_text": ("FUSED", "MODALITY_MASK", "MODALITY_STATUS"),
}
CAPTIONS = (
    "a photo of a cat", "a red car parked on a quiet street", "two dogs playing in the snow",
    "a bowl of fruit on a wooden table", "an old man reading a newspaper", "a city skyline at night",
    "a child riding a bicycle", "a plate of pasta with tomato sauce", "a sailboat on a calm lake",
    "a black and white photo of a bridge", "a woman holding an umbrella in the rain",
    "a close-up of a yellow flower", "a train arriving at a station", "a cup of coffee",
    "a mountain covered in snow under a blue sky", "people walking through a busy market",
)


# -- profiles (data: mmfuse/profiles/*.json, applied by mmfuse.profiles.apply_profile) ---------------------------
PROFILES: dict[str, dict[str, Tuning]] = {name: load_profile(name).models for name in profile_names()}


def build_repository(target: Path, model_name: str, profile: str, source: Path | None = None,
                     extra_params: dict[str, dict[str, str]] | None = None) -> Path:
    """A copy of the models the three ensembles need, switched to ``model_name`` with random weights,
    late fusion without a head, and the ``profile``'s settings."""
    from .export import set_fusion_head
    from .repository import set_parameters, set_sequence_routing
    from .paths import DEFAULT_MODEL_REPOSITORY

    source = Path(source or DEFAULT_MODEL_REPOSITORY)
    target.mkdir(parents=True, exist_ok=True)
    for model in BENCH_MODELS:
        shutil.copytree(source / model, target / model, ignore=shutil.ignore_patterns("__pycache__", "*.safetensors"))
    for model in OPEN_CLIP_MODELS:
        values = {"model_name": model_name, "pretrained": ""}
        if model.endswith("encoder"):
            values.update(allow_random_init="true", seed="0")
        set_parameters(target, model, values)
    set_parameters(target, "fusion", {"strategy": "late", "weights": "0.5,0.5", "normalize": "true",
                                      "allow_random_init": "false"})
    set_fusion_head(target, "fusion", "late", "", has_head=False)
    # Late fusion reads the pooled embeddings only: a late deployment does not route the token sequences
    # (the encoders then skip converting and shipping them); the baseline keeps the shipped routing.
    set_sequence_routing(target, "fuse_image_text", "fusion", load_profile(profile).route_sequences)
    apply_profile(target, profile, extra_params=extra_params)
    return target


# -- machine ---------------------------------------------------------------------------------------------------------
def machine_info() -> dict[str, Any]:
    import torch

    flags: set[str] = set()
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and model in ("", platform.machine(), platform.processor()):
                model = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    units = sorted(flags & {"amx_bf16", "amx_tile", "amx_int8", "avx512_bf16", "avx512_fp16", "avx512f", "avx2"})
    info = {
        "cpu": model, "cores": os.cpu_count(), "machine": platform.machine(), "flags": units,
        "bf16_matrix_units": bool(flags & {"amx_bf16", "avx512_bf16"}),
        "torch": torch.__version__, "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "python": platform.python_version(), "host": platform.node(),
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def load_average() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


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


def machine_peak(quick: bool = False, device: str = "cpu") -> dict[str, Any]:
    """Peak matmul GFLOP/s per dtype: the best of all threads in one process and of one thread times the
    number of cores (the serving processes each run one thread). The larger is the limit: conservative."""
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
        all_threads = max(matmul_rate(dtype, s, threads=cores, seconds=seconds) for s in sizes)
        one_thread = max(matmul_rate(dtype, s, threads=1, seconds=seconds) for s in sizes)
        out[dtype] = {"all_threads_gflops": all_threads, "one_thread_gflops": one_thread,
                      "per_core_times_cores_gflops": one_thread * cores,
                      "peak_gflops": max(all_threads, one_thread * cores)}
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
                per = _timed(lambda: F.linear(x[k], w), seconds / 4, min_reps=3)
            total_flops += 2.0 * batch * tokens * k * n
            total_s += per
        return {"dtype": dtype, "batch": batch, "tokens": tokens, "threads": threads,
                "gflops": total_flops / total_s / 1e9}
    finally:
        torch.set_num_threads(previous)


def encoder_steps(model_name: str, precision: str, batch: int, seconds: float, threads: int = 1) -> dict[str, Any]:
    """Before/after of the image encoder's own speed-ups, in-process: the patch embedding as a convolution vs
    as one matrix product, and the tower with vs without converting the token sequence to float32."""
    import torch

    from mmfuse.serving.encoders import ImageEncoder
    from mmfuse.serving.openclip_models import ClipSpec, torch_dtype

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        encoder = ImageEncoder(ClipSpec(model_name, allow_random_init=True, precision=precision))
        size = encoder.visual.image_size
        size = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
        pixels = np.random.default_rng(0).standard_normal((batch, 3) + size).astype(np.float32)
        out: dict[str, Any] = {"precision": precision, "batch": batch, "threads": threads}
        if encoder.fast_patch_embedding:
            fast = encoder.visual.conv1
            conv = torch.nn.Conv2d(3, fast.out_channels, fast.patch, stride=fast.patch, bias=fast.bias is not None)
            with torch.no_grad():
                conv.weight.copy_(fast.weight.t().reshape(conv.weight.shape))
            conv = conv.to(torch_dtype(precision)).eval()
            x = torch.from_numpy(pixels).to(torch_dtype(precision))
            with torch.inference_mode():
                out["patch_embedding_conv_ms"] = 1e3 * _timed(lambda: conv(x), seconds / 4, min_reps=2)
                out["patch_embedding_matmul_ms"] = 1e3 * _timed(lambda: fast(x), seconds / 4, min_reps=2)
        out["tower_with_sequence_ms"] = 1e3 * _timed(lambda: encoder.encode(pixels, sequence=True), seconds / 4, min_reps=1)
        out["tower_embedding_only_ms"] = 1e3 * _timed(lambda: encoder.encode(pixels, sequence=False), seconds / 4, min_reps=1)
        return out
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


# -- inputs ----------------------------------------------------------------------------------------------------------
def photo_like_jpeg(width: int, height: int, seed: int, quality: int = 90) -> bytes:
    """A deterministic photo-like JPEG: smooth colour fields (bicubic-upsampled noise) plus grain."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (height // 16 + 2, width // 16 + 2, 3), dtype=np.uint8)
    smooth = np.asarray(Image.fromarray(base).resize((width, height), Image.BICUBIC), dtype=np.int16)
    grain = rng.integers(-12, 13, (height, width, 3), dtype=np.int16)
    out = io.BytesIO()
    Image.fromarray(np.clip(smooth + grain, 0, 255).astype(np.uint8)).save(out, format="JPEG", quality=quality)
    return out.getvalue()


def bench_inputs(count: int, width: int, height: int) -> tuple[list[bytes], list[str]]:
    images = [photo_like_jpeg(width, height, seed) for seed in range(count)]
    captions = [CAPTIONS[i % len(CAPTIONS)] for i in range(count)]
    return images, captions


def _timed(fn: Callable[[], Any], seconds: float, min_reps: int = 2, max_reps: int = 10_000) -> float:
    """Mean seconds per call of ``fn`` over at least ``min_reps`` calls and about ``seconds``."""
    fn()
    reps, started = 0, time.perf_counter()
    while reps < min_reps or (time.perf_counter() - started < seconds and reps < max_reps):
        fn()
        reps += 1
    return (time.perf_counter() - started) / reps


# -- naive loop --------------------------------------------------------------------------------------------------------
def naive_loop(model_name: str, images: Sequence[bytes], captions: Sequence[str], items: int) -> dict[str, Any]:
    """open_clip as its README runs it: fp32, one item at a time. Measured with torch's default threads and with
    one thread; the faster of the two is the reference (on a busy machine the default can be the slower)."""
    import open_clip
    import torch
    from PIL import Image

    from mmfuse.serving.openclip_models import register_model_configs

    register_model_configs()
    torch.manual_seed(0)
    model, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=None)
    model.eval()
    tokenizer = open_clip.get_tokenizer(model_name)

    def image(i: int):
        x = preprocess(Image.open(io.BytesIO(images[i % len(images)]))).unsqueeze(0)
        return model.encode_image(x, normalize=True)

    def text(i: int):
        return model.encode_text(tokenizer([captions[i % len(captions)]]), normalize=True)

    def fuse(i: int):
        return torch.nn.functional.normalize((image(i) + text(i)) / 2, dim=-1)

    default = torch.get_num_threads()
    out: dict[str, Any] = {"items": items, "default_threads": default}
    try:
        for threads in dict.fromkeys((default, 1)):
            torch.set_num_threads(threads)
            with torch.no_grad():
                image(0), text(0)
                for name, step in (("embed_image", image), ("embed_text", text), ("fuse_image_text", fuse)):
                    started = time.perf_counter()
                    for i in range(items):
                        step(i)
                    out.setdefault(f"{name}_per_s_by_threads", {})[str(threads)] = items / (time.perf_counter() - started)
    finally:
        torch.set_num_threads(default)
    for name in ("embed_image", "embed_text", "fuse_image_text"):
        by_threads = out[f"{name}_per_s_by_threads"]
        out[f"{name}_per_s"] = max(by_threads.values())
    return out


# -- preprocessing -----------------------------------------------------------------------------------------------------
def preprocessing(model_name: str, images: Sequence[bytes], seconds: float, batch: int = 16) -> dict[str, Any]:
    """Per-image cost of each step, exact vs reduced-size JPEG decoding, and handler throughput by threads."""
    import torch

    from mmfuse.serving.image_preprocess import ImagePreprocessor
    from mmfuse.serving.openclip_models import ClipSpec

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        spec = ClipSpec(model_name)
        exact = ImagePreprocessor(spec, decode_threads=1)
        legacy = ImagePreprocessor(spec, decode_threads=1, fast_tail=False)
        draft = ImagePreprocessor(spec, decode_threads=1, jpeg_draft=True)
        data = images[0]
        image = exact.decode(data)
        geometry = exact._geometry or exact.transform
        resized = geometry(image)
        per = seconds / 6
        steps = {
            "decode_ms": 1e3 * _timed(lambda: exact.decode(data), per),
            "resize_crop_ms": 1e3 * _timed(lambda: geometry(image), per),
            "to_tensor_normalize_ms": 1e3 * _timed(lambda: legacy.transform.transforms[-1](
                legacy.transform.transforms[-2](resized)), per),
            "lookup_table_tail_ms": 1e3 * _timed(lambda: exact._table[0][np.asarray(resized)[:, :, 0]], per),
            "open_clip_transform_path_ms": 1e3 * _timed(lambda: legacy.preprocess_one(data), per),
            "exact_path_ms": 1e3 * _timed(lambda: exact.preprocess_one(data), per),
            "jpeg_draft_path_ms": 1e3 * _timed(lambda: draft.preprocess_one(data), per),
            "draft_decode_ms": 1e3 * _timed(lambda: draft.decode(data), per),
        }
        diffs, exact_pixels, draft_pixels = [], [], []
        for item in images:
            a, b = exact.preprocess_one(item)[0], legacy.preprocess_one(item)[0]
            c = draft.preprocess_one(item)[0]
            diffs.append((float(np.abs(a - b).max()), float(np.abs(a - c).mean()), float(np.abs(a - c).max())))
            exact_pixels.append(a)
            draft_pixels.append(c)
        # What the pixel difference does to the embedding: the fp32 image tower (the bench's seeded random
        # weights) on the exact and the draft pixels of every image.
        from mmfuse.serving.encoders import ImageEncoder

        tower = ImageEncoder(ClipSpec(model_name, allow_random_init=True, seed=0))
        draft_cosine = float(_cosines(tower.encode(np.stack(exact_pixels), sequence=False)[0],
                                      tower.encode(np.stack(draft_pixels), sequence=False)[0]).min())
        del tower
        rows = [images[i % len(images)] for i in range(batch)]
        column = np.empty((batch, 1), dtype=object)
        column[:, 0] = rows
        threads = {}
        cores = os.cpu_count() or 1
        for n in [t for t in (1, 2, 4, 8, 16) if t <= max(2, cores)]:
            handler = ImagePreprocessor(spec, decode_threads=n)
            try:
                per_batch = _timed(lambda: handler({"IMAGE": column}, frozenset({"PIXELS"})), seconds / 4, min_reps=1)
                threads[str(n)] = batch / per_batch
            finally:
                handler.close()
        for handler in (exact, legacy, draft):
            handler.close()
        return {
            "image_size": list(image.size), "encoded_kb": round(len(data) / 1024, 1), "per_image": steps,
            "exact_vs_open_clip_max_abs": max(d[0] for d in diffs),
            "draft_vs_exact_mean_abs": float(np.mean([d[1] for d in diffs])),
            "draft_vs_exact_max_abs": max(d[2] for d in diffs),
            "draft_vs_exact_embedding_min_cosine": draft_cosine,
            "handler_images_per_s_by_decode_threads": threads, "batch": batch,
        }
    finally:
        torch.set_num_threads(previous)


# -- encoders in-process: trimming and precision ----------------------------------------------------------------------
def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return (a * b).sum(-1) / np.maximum(np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1), 1e-30)


def text_trimming(model_name: str, captions: Sequence[str], precision: str, seconds: float, batch: int = 64,
                  threads: int = 1, device: str = "cpu") -> dict[str, Any]:
    import torch

    from mmfuse.serving.encoders import TextEncoder
    from mmfuse.serving.openclip_models import ClipSpec, load_tokenizer

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        tokens = load_tokenizer(ClipSpec(model_name))([captions[i % len(captions)] for i in range(batch)]).numpy()
        lengths = tokens.argmax(axis=1) + 1
        out: dict[str, Any] = {"batch": batch, "precision": precision, "threads": threads,
                               "longest_tokens": int(lengths.max()), "mean_tokens": float(lengths.mean()),
                               "context_length": int(tokens.shape[1])}
        embed = frozenset({"EMBEDDING"})
        exactness = {}
        for prec in dict.fromkeys(("fp32", precision)):
            encoder = TextEncoder(ClipSpec(model_name, allow_random_init=True, precision=prec), device, trim=True)

            def run(trim: bool):
                encoder.trim = trim  # one model, both ways
                return encoder({"TOKENS": tokens}, embed)["EMBEDDING"]

            a, b = run(True), run(False)
            exactness[prec] = {"max_abs_diff": float(np.abs(a - b).max()), "min_cosine": float(_cosines(a, b).min())}
            if prec == precision:
                out["trimmed_per_s"] = batch / _timed(lambda: run(True), seconds / 2, min_reps=1)
                out["padded_per_s"] = batch / _timed(lambda: run(False), seconds / 2, min_reps=1)
            del encoder
            gc.collect()
        out["trimmed_vs_padded"] = exactness
        out["speedup"] = out["trimmed_per_s"] / out["padded_per_s"]
        return out
    finally:
        torch.set_num_threads(previous)


def precision_cost(model_name: str, images: Sequence[bytes], captions: Sequence[str], precisions: Sequence[str],
                   seconds: float, batch: int = 16, threads: int = 1, device: str = "cpu") -> dict[str, Any]:
    """Throughput of each tower per precision (in-process handlers) and cosine of its embeddings vs fp32."""
    import torch

    from mmfuse.serving.encoders import ImageEncoder, TextEncoder
    from mmfuse.serving.image_preprocess import ImagePreprocessor
    from mmfuse.serving.openclip_models import ClipSpec, load_tokenizer

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        pre = ImagePreprocessor(ClipSpec(model_name), decode_threads=1)
        column = np.empty((batch, 1), dtype=object)
        column[:, 0] = [images[i % len(images)] for i in range(batch)]
        pixels = pre({"IMAGE": column}, frozenset({"PIXELS"}))["PIXELS"]
        pre.close()
        tokens = load_tokenizer(ClipSpec(model_name))([captions[i % len(captions)] for i in range(batch)]).numpy()
        embed = frozenset({"EMBEDDING"})
        results: dict[str, Any] = {"batch": batch, "threads": threads, "device": device}
        reference: dict[str, np.ndarray] = {}
        for prec in ("fp32",) + tuple(p for p in precisions if p != "fp32"):
            spec = ClipSpec(model_name, allow_random_init=True, precision=prec)
            row: dict[str, Any] = {}
            for tower, handler_type, feed in (("image", ImageEncoder, {"PIXELS": pixels}),
                                              ("text", TextEncoder, {"TOKENS": tokens})):
                handler = handler_type(spec, device)
                emb = handler(feed, embed)["EMBEDDING"]
                if device.startswith("cuda"):
                    def call(h=handler, f=feed):
                        h(f, embed)
                        torch.cuda.synchronize()
                else:
                    def call(h=handler, f=feed):
                        h(f, embed)
                row[f"{tower}_per_s"] = batch / _timed(call, seconds / 4, min_reps=1)
                if prec == "fp32":
                    reference[tower] = emb
                row[f"{tower}_min_cosine_vs_fp32"] = float(_cosines(emb, reference[tower]).min())
                del handler
                gc.collect()
            if device == "cpu":  # the towers compiled by OpenVINO (engine openvino), same weights, same threads
                for tower, handler_type, feed in (("image", ImageEncoder, {"PIXELS": pixels}),
                                                  ("text", TextEncoder, {"TOKENS": tokens})):
                    handler = handler_type(spec, device, engine="openvino", threads=threads)
                    emb = handler(feed, embed)["EMBEDDING"]
                    row[f"{tower}_openvino_per_s"] = batch / _timed(lambda h=handler, f=feed: h(f, embed),
                                                                    seconds / 4, min_reps=1)
                    row[f"{tower}_openvino_min_cosine_vs_fp32"] = float(_cosines(emb, reference[tower]).min())
                    del handler
                    gc.collect()
            results[prec] = row
        for prec in precisions:
            if prec != "fp32":
                results[f"{prec}_image_speedup"] = results[prec]["image_per_s"] / results["fp32"]["image_per_s"]
                results[f"{prec}_text_speedup"] = results[prec]["text_per_s"] / results["fp32"]["text_per_s"]
        return results
    finally:
        torch.set_num_threads(previous)


def profile_handlers(model_name: str, profile: str, images: Sequence[bytes], captions: Sequence[str],
                     batch: int, seconds: float) -> dict[str, Any]:
    """The encoders built exactly as Triton builds them for ``profile`` (its parameters, its instance kind), fed
    one batch: where the weights live, throughput, and cosine against fp32 on the CPU."""
    import torch

    from mmfuse.serving.encoders import ImageEncoder, TextEncoder
    from mmfuse.serving.image_preprocess import ImagePreprocessor
    from mmfuse.serving.openclip_models import ClipSpec, load_tokenizer

    pre = ImagePreprocessor(ClipSpec(model_name), decode_threads=4)
    pixels = pre({"IMAGE": _bytes_column([images[i % len(images)] for i in range(batch)])}, frozenset({"PIXELS"}))["PIXELS"]
    pre.close()
    tokens = load_tokenizer(ClipSpec(model_name))([captions[i % len(captions)] for i in range(batch)]).numpy()
    embed = frozenset({"EMBEDDING"})
    out: dict[str, Any] = {"profile": profile, "batch": batch}
    for model, handler_type, feed in (("image_encoder", ImageEncoder, {"PIXELS": pixels}),
                                      ("text_encoder", TextEncoder, {"TOKENS": tokens})):
        tuning = PROFILES[profile][model]
        from mmfuse.serving.params import ModelContext, Params

        params = Params(model, {"model_name": model_name, "pretrained": "", "allow_random_init": "true", "seed": "0",
                                **tuning.params})
        kind = "GPU" if tuning.kind == "KIND_GPU" else "CPU"
        handler = handler_type.from_parameters(ModelContext(model, None, instance_kind=kind), params)
        params.reject_unknown()
        module = handler.visual if hasattr(handler, "visual") else handler.model
        weight = next(module.parameters())
        sync = torch.cuda.synchronize if weight.is_cuda else (lambda: None)

        def call(h=handler, f=feed):
            h(f, embed)
            sync()

        got = handler(feed, embed)["EMBEDDING"]
        rate = batch / _timed(call, seconds, min_reps=2)
        del handler
        reference_type = handler_type(ClipSpec(model_name, allow_random_init=True, seed=0), "cpu")
        reference = reference_type(feed, embed)["EMBEDDING"]
        del reference_type
        out[model] = {"instance_kind": kind, "weights_device": str(weight.device), "weights_dtype": str(weight.dtype),
                      "items_per_s": rate, "min_cosine_vs_fp32_cpu": float(_cosines(got, reference).min())}
    return out


def _ceiling_worker(model_name: str, precision: str, engine: str, draft: bool, images: Sequence[bytes], batch: int,
                    seconds: float, barrier, queue) -> None:
    """One core of the measured ceiling: decode and encode batches in a loop, one thread, no serving."""
    try:
        import torch

        torch.set_num_threads(1)
        from mmfuse.serving.encoders import DecodingImageEncoder, ImageEncoder
        from mmfuse.serving.image_preprocess import ImagePreprocessor
        from mmfuse.serving.openclip_models import ClipSpec, register_model_configs

        register_model_configs()
        handler = DecodingImageEncoder(
            ImagePreprocessor(ClipSpec(model_name), decode_threads=1, jpeg_draft=draft),
            ImageEncoder(ClipSpec(model_name, allow_random_init=True, seed=0, precision=precision), engine=engine,
                         threads=1))
        column, embed = _bytes_column([images[i % len(images)] for i in range(batch)]), frozenset({"EMBEDDING"})
        for _ in range(2):
            handler({"IMAGE": column}, embed)
        barrier.wait(timeout=900)
        started, done = time.perf_counter(), 0
        while time.perf_counter() - started < seconds:
            handler({"IMAGE": column}, embed)
            done += batch
        queue.put(done / (time.perf_counter() - started))
    except Exception as error:  # noqa: BLE001 - reported by the parent
        barrier.abort()
        queue.put(f"{type(error).__name__}: {error}")


def measured_ceiling(model_name: str, precision: str, engine: str, draft: bool, images: Sequence[bytes],
                     seconds: float, batch: int = 8, workers: int | None = None) -> dict[str, Any]:
    """embed_image's work with no serving at all, measured: ``workers`` processes (one per core), each
    decoding and encoding batches in one thread, all at the same time. What they do together bounds what a
    server on this machine can serve (it does the same work, plus Triton, gRPC and the client's)."""
    import multiprocessing

    workers = workers or os.cpu_count() or 1
    context = multiprocessing.get_context("spawn")  # a fresh interpreter: no torch state forked
    barrier, queue = context.Barrier(workers), context.Queue()
    processes = [context.Process(target=_ceiling_worker, daemon=True,
                                 args=(model_name, precision, engine, draft, list(images), batch, seconds, barrier, queue))
                 for _ in range(workers)]
    for process in processes:
        process.start()
    try:
        rates = [queue.get(timeout=900 + seconds) for _ in processes]
    finally:
        for process in processes:
            process.join(timeout=10)
            if process.is_alive():
                process.kill()
    errors = [r for r in rates if isinstance(r, str)]
    if errors:
        raise RuntimeError(f"measured ceiling: {errors[0]}")
    return {"workers": workers, "batch": batch, "engine": engine, "precision": precision, "jpeg_draft": draft,
            "seconds": seconds, "per_worker_per_s": rates, "embed_image_per_s": float(sum(rates))}


# -- served ---------------------------------------------------------------------------------------------------------
def _bytes_column(items: Sequence[bytes | str]) -> np.ndarray:
    column = np.empty((len(items), 1), dtype=object)
    column[:, 0] = [item.encode() if isinstance(item, str) else item for item in items]
    return column


def make_requests(ensemble: str, images: Sequence[bytes], captions: Sequence[str], rows: int, count: int):
    """``count`` distinct requests of ``rows`` rows each (cycling through the inputs)."""
    from tritonclient.grpc import InferInput, InferRequestedOutput

    requests = []
    for r in range(count):
        picks = [(r * rows + i) for i in range(rows)]
        inputs = []
        if ensemble in ("embed_image", "fuse_image_text"):
            tensor = InferInput("IMAGE", [rows, 1], "BYTES")
            tensor.set_data_from_numpy(_bytes_column([images[i % len(images)] for i in picks]))
            inputs.append(tensor)
        if ensemble in ("embed_text", "fuse_image_text"):
            tensor = InferInput("TEXT", [rows, 1], "BYTES")
            tensor.set_data_from_numpy(_bytes_column([captions[i % len(captions)] for i in picks]))
            inputs.append(tensor)
        outputs = [InferRequestedOutput(name) for name in ENSEMBLE_OUTPUTS[ensemble]]
        requests.append((inputs, outputs))
    return requests


def _percentiles(latencies: Sequence[float]) -> dict[str, float]:
    if not latencies:
        return {"p50_ms": math.nan, "p95_ms": math.nan, "p99_ms": math.nan, "mean_ms": math.nan}
    ms = np.asarray(latencies) * 1e3
    return {"p50_ms": float(np.percentile(ms, 50)), "p95_ms": float(np.percentile(ms, 95)),
            "p99_ms": float(np.percentile(ms, 99)), "mean_ms": float(ms.mean())}


async def _closed_loop(url: str, ensemble: str, requests, rows: int, concurrency: int, warmup_s: float,
                       duration_s: float, max_requests: int) -> dict[str, Any]:
    from tritonclient.grpc.aio import InferenceServerClient

    client = InferenceServerClient(url)
    latencies: list[float] = []
    state = {"measuring": False, "stop": False, "sent": 0, "done_rows": 0, "errors": 0}

    async def worker(k: int) -> None:
        i = k
        while not state["stop"] and state["sent"] < max_requests:
            inputs, outputs = requests[i % len(requests)]
            i += concurrency
            measuring = state["measuring"]
            state["sent"] += measuring
            started = time.perf_counter()
            try:
                await client.infer(ensemble, inputs, outputs=outputs, client_timeout=120)
            except Exception:  # noqa: BLE001 - counted, reported
                state["errors"] += 1
                continue
            if measuring and state["measuring"]:
                latencies.append(time.perf_counter() - started)
                state["done_rows"] += rows

    try:
        tasks = [asyncio.create_task(worker(k)) for k in range(concurrency)]
        await asyncio.sleep(warmup_s)
        state["measuring"] = True
        cpu0 = _session_cpu_seconds()
        started = time.perf_counter()
        while time.perf_counter() - started < duration_s and state["sent"] < max_requests:
            await asyncio.sleep(0.05)
        state["measuring"] = False
        elapsed = time.perf_counter() - started
        cpu1 = _session_cpu_seconds()
        state["stop"] = True
        await asyncio.gather(*tasks)
    finally:
        await client.close()
    return {"ensemble": ensemble, "rows_per_request": rows, "concurrency": concurrency, "seconds": elapsed,
            "requests": len(latencies), "errors": state["errors"],
            "items_per_s": state["done_rows"] / elapsed, **_percentiles(latencies),
            "server_cpu_cores": (cpu1 - cpu0) / elapsed if cpu0 is not None and cpu1 is not None else None}


async def _fixed_rate(url: str, ensemble: str, requests, rows: int, rate: float, duration_s: float,
                      warmup_s: float) -> dict[str, Any]:
    """Requests sent at a constant rate (open loop); latency from each request's scheduled time."""
    from tritonclient.grpc.aio import InferenceServerClient

    client = InferenceServerClient(url)
    latencies: list[float] = []
    errors = 0
    total = max(1, int(rate * (warmup_s + duration_s)))
    first_measured = int(rate * warmup_s)

    async def one(i: int, scheduled: float) -> None:
        nonlocal errors
        inputs, outputs = requests[i % len(requests)]
        try:
            await client.infer(ensemble, inputs, outputs=outputs, client_timeout=120)
        except Exception:  # noqa: BLE001
            errors += 1
            return
        if i >= first_measured:
            latencies.append(time.perf_counter() - scheduled)

    try:
        tasks = []
        started = time.perf_counter()
        cpu0 = None
        for i in range(total):
            scheduled = started + i / rate
            delay = scheduled - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            if i == first_measured:
                cpu0, t0 = _session_cpu_seconds(), time.perf_counter()
            tasks.append(asyncio.create_task(one(i, scheduled)))
        await asyncio.gather(*tasks)
        elapsed = time.perf_counter() - (t0 if cpu0 is not None else started)
        cpu1 = _session_cpu_seconds()
    finally:
        await client.close()
    return {"ensemble": ensemble, "rows_per_request": rows, "rate_requests_per_s": rate,
            "items_per_s_offered": rate * rows, "requests": len(latencies), "errors": errors, **_percentiles(latencies),
            "server_cpu_cores": (cpu1 - cpu0) / elapsed if cpu0 is not None and cpu1 is not None else None}


_SERVER_SID: list[int] = []


def _session_cpu_seconds() -> float | None:
    """CPU seconds (user+system) of every process in the server's session: tritonserver and its stubs."""
    if not _SERVER_SID:
        return None
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == _SERVER_SID[0]:  # fields after "(comm)": state ppid pgrp session ...
            total += int(fields[11]) + int(fields[12])
    return total / ticks


def statistics(url: str) -> dict[str, dict[str, float]]:
    """Triton's cumulative per-model statistics: counts and nanoseconds per phase."""
    from tritonclient.grpc import InferenceServerClient

    with InferenceServerClient(url) as client:
        raw = client.get_inference_statistics(as_json=True)
    out = {}
    for model in raw.get("model_stats", []):
        stats = model.get("inference_stats", {})
        row = {"inference_count": float(model.get("inference_count", 0)),
               "execution_count": float(model.get("execution_count", 0))}
        for phase in ("success", "queue", "compute_input", "compute_infer", "compute_output"):
            row[f"{phase}_count"] = float(stats.get(phase, {}).get("count", 0))
            row[f"{phase}_ns"] = float(stats.get(phase, {}).get("ns", 0))
        out[model["name"]] = row
    return out


def statistics_delta(before: dict, after: dict) -> dict[str, dict[str, float]]:
    """Per model over a window: requests, mean ms per request by phase, mean batch size."""
    out = {}
    for name, row in after.items():
        prev = before.get(name, {})
        d = {k: v - prev.get(k, 0.0) for k, v in row.items()}
        n = d["success_count"]
        if n <= 0:
            continue
        out[name] = {
            "requests": n,
            "mean_request_ms": d["success_ns"] / n / 1e6,
            "queue_ms": d["queue_ns"] / n / 1e6,
            "compute_input_ms": d["compute_input_ns"] / n / 1e6,
            "compute_infer_ms": d["compute_infer_ns"] / n / 1e6,
            "compute_output_ms": d["compute_output_ns"] / n / 1e6,
            "mean_batch_rows": d["inference_count"] / d["execution_count"] if d["execution_count"] else math.nan,
        }
    return out


def served_outputs_check(url: str, model_name: str, images: Sequence[bytes], captions: Sequence[str],
                         precision: str) -> dict[str, float]:
    """Served embeddings against the in-process fp32 towers on the same seeded weights: min cosine."""
    import torch

    from mmfuse.serving.encoders import ImageEncoder, TextEncoder
    from mmfuse.serving.image_preprocess import ImagePreprocessor
    from mmfuse.serving.openclip_models import ClipSpec, load_tokenizer
    from tritonclient.grpc import InferenceServerClient, InferInput

    n = min(4, len(images))
    with InferenceServerClient(url) as client:
        def ask(model, name, items):
            tensor = InferInput(name, [len(items), 1], "BYTES")
            tensor.set_data_from_numpy(_bytes_column(items))
            return client.infer(model, [tensor])
        image_emb = ask("embed_image", "IMAGE", images[:n]).as_numpy("EMBEDDING")
        text_emb = ask("embed_text", "TEXT", captions[:n]).as_numpy("EMBEDDING")
    torch.set_num_threads(1)
    spec = ClipSpec(model_name, allow_random_init=True, seed=0)
    pre = ImagePreprocessor(ClipSpec(model_name), decode_threads=1)
    pixels = pre({"IMAGE": _bytes_column(images[:n])}, frozenset({"PIXELS"}))["PIXELS"]
    pre.close()
    ref_image = ImageEncoder(spec)({"PIXELS": pixels}, frozenset({"EMBEDDING"}))["EMBEDDING"]
    tokens = load_tokenizer(spec)(list(captions[:n])).numpy()
    ref_text = TextEncoder(spec)({"TOKENS": tokens}, frozenset({"EMBEDDING"}))["EMBEDDING"]
    return {"served_precision": precision,
            "image_min_cosine_vs_fp32_in_process": float(_cosines(image_emb, ref_image).min()),
            "text_min_cosine_vs_fp32_in_process": float(_cosines(text_emb, ref_text).min())}


@dataclass
class ServedPlan:
    rows: int = 4
    concurrency: int = 8
    warmup_s: float = 5.0
    duration_s: float = 20.0
    text_duration_s: float = 8.0
    load_fraction: float = 0.7
    max_requests: int = 20_000
    # p99 from 200 requests is their 2nd-worst and moved 1.15-2.36 between two runs on the same settings: the
    # fixed-rate window runs until it has this many requests (at most at_load_max_s), so p99 is the 5th-worst.
    at_load_min_requests: int = 500
    at_load_max_s: float = 60.0


def served(repository: Path, model_name: str, images: Sequence[bytes], captions: Sequence[str], plan: ServedPlan,
           log_dir: Path, precision: str, ensembles: Sequence[str] = ("embed_image", "embed_text", "fuse_image_text"),
           fixed_rate: bool = True, check_outputs: bool = True) -> dict[str, Any]:
    from .server import ServerConfig, ServerError, TritonServer

    server = None
    for attempt in range(3):
        server = TritonServer(ServerConfig.on_free_ports(model_repository=repository),
                              log_path=log_dir / f"tritonserver.{attempt}.log")
        started = time.perf_counter()
        try:
            server.__enter__()
            break
        except ServerError:
            if attempt == 2:
                raise
    out: dict[str, Any] = {"startup_s": time.perf_counter() - started}
    _SERVER_SID[:] = [server.process.pid]
    try:
        if check_outputs:
            out["outputs"] = served_outputs_check(server.grpc_url, model_name, images, captions, precision)
        for ensemble in ensembles:
            requests = make_requests(ensemble, images, captions, plan.rows, max(8, 2 * plan.concurrency))
            duration = plan.text_duration_s if ensemble == "embed_text" else plan.duration_s
            before = statistics(server.grpc_url)
            out[ensemble] = asyncio.run(_closed_loop(server.grpc_url, ensemble, requests, plan.rows, plan.concurrency,
                                                     plan.warmup_s, duration, plan.max_requests))
            out[ensemble]["models"] = statistics_delta(before, statistics(server.grpc_url))
        if fixed_rate and "fuse_image_text" in out:
            peak = out["fuse_image_text"]["items_per_s"]
            rate = max(plan.load_fraction * peak / plan.rows, 0.2)  # a stalled closed loop still gets a rate
            requests = make_requests("fuse_image_text", images, captions, plan.rows, 16)
            before = statistics(server.grpc_url)
            window = max(plan.duration_s, min(plan.at_load_min_requests / rate, plan.at_load_max_s))
            run = asyncio.run(_fixed_rate(server.grpc_url, "fuse_image_text", requests, plan.rows, rate,
                                          window, plan.warmup_s))
            models = statistics_delta(before, statistics(server.grpc_url))
            fusion = models.get("fusion", {})
            fusion_ms = fusion.get("mean_request_ms", math.nan)
            run.update(load_fraction=plan.load_fraction, models=models, fusion_ms=fusion_ms,
                       fusion_share_of_p50=fusion_ms / run["p50_ms"] if run["p50_ms"] else math.nan,
                       p99_over_p50=run["p99_ms"] / run["p50_ms"] if run["p50_ms"] else math.nan)
            out["fuse_image_text_at_load"] = run
    finally:
        _SERVER_SID.clear()
        server.stop()
    return out


# -- the whole run ---------------------------------------------------------------------------------------------------
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
    def quick_options(cls, **overrides) -> "BenchOptions":
        plan = ServedPlan(rows=2, concurrency=4, warmup_s=1.0, duration_s=3.0, text_duration_s=2.0, max_requests=400,
                          at_load_min_requests=0)
        return cls(**{"quick": True, "images": 4, "image_size": (320, 240), "plan": plan, "naive_items": 3,
                      "seconds": 0.5, **overrides})


def serving_precision(profile: str, device: str = "cpu") -> str:
    tuning = PROFILES.get(profile, {}).get("image_encoder")
    if tuning is not None and "precision" in tuning.params:
        return tuning.params["precision"]
    return "fp32"


def run_bench(options: BenchOptions, progress: Callable[[str], None] = print) -> dict[str, Any]:
    """Every measurement, in order, in one run. Returns the JSON-able result (see ``table``)."""
    import torch

    from mmfuse.serving.openclip_models import ClipSpec, load_tokenizer, register_model_configs

    register_model_configs()
    started = time.perf_counter()
    result: dict[str, Any] = {"options": _jsonable(asdict(options)), "machine": machine_info(),
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
        result["encoder_steps"] = encoder_steps(options.model, precision, batch=4 if options.quick else 8,
                                                seconds=options.seconds)
    gc.collect()  # the models of the step before: one at a time on a small machine
    progress("naive in-process loop (open_clip fp32, one item at a time) ...")
    result["naive"] = naive_loop(options.model, images, captions, options.naive_items) if cpu else None
    gc.collect()  # the models of the step before: one at a time on a small machine
    progress("image decoding and resizing ...")
    result["preprocessing"] = preprocessing(options.model, images, options.seconds)
    gc.collect()  # the models of the step before: one at a time on a small machine
    progress("text: trimmed vs padded ...")
    result["text_trimming"] = text_trimming(options.model, captions, precision, options.seconds,
                                            batch=16 if options.quick else 64, device=_torch_device(options.device))
    gc.collect()  # the models of the step before: one at a time on a small machine
    progress("precision ...")
    precisions = ("fp32", "bf16") if cpu else ("fp32", "fp16", "bf16")
    batch = 4 if options.quick else (16 if cpu else 64)
    result["precision"] = precision_cost(options.model, images, captions, precisions, options.seconds,
                                         batch=batch, device=_torch_device(options.device))
    if not cpu:
        progress(f"encoders built from profile {options.profile!r} as Triton builds them ...")
        result["profile_handlers"] = profile_handlers(options.model, options.profile, images, captions, batch,
                                                      options.seconds / 2)
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
            result["ceiling_measured"] = measured_ceiling(options.model, precision, engine, draft, images,
                                                          seconds=2 * options.seconds, batch=4 if options.quick else 8)
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


def _jsonable(value):
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (np.floating, np.integer)):
        return _jsonable(value.item())
    return value


def summarise(result: dict[str, Any]) -> dict[str, Any]:
    """The ratios the issue asks for, in one place."""
    limit, naive, served_ = result["limit"], result.get("naive") or {}, result.get("served") or {}
    summary: dict[str, Any] = {"limit_dtype": limit["dtype"]}
    for ensemble in ("embed_image", "embed_text", "fuse_image_text"):
        row = served_.get(ensemble)
        if not row:
            continue
        rate = row["items_per_s"]
        entry = {"served_per_s": rate, "limit_per_s": limit[f"{ensemble}_per_s"],
                 "served_over_limit": rate / limit[f"{ensemble}_per_s"]}
        cores, used = (result.get("machine") or {}).get("cores"), row.get("server_cpu_cores")
        if cores and used:
            # On a shared machine the server gets only part of the CPU: what it served per core it used,
            # times the cores, estimates the figure on a machine of its own (an estimate, labelled as one).
            entry["served_per_server_core"] = rate / used
            entry["load_normalised_served_over_limit"] = rate / used * cores / limit[f"{ensemble}_per_s"]
        if naive.get(f"{ensemble}_per_s"):
            entry["naive_per_s"] = naive[f"{ensemble}_per_s"]
            entry["served_over_naive"] = rate / naive[f"{ensemble}_per_s"]
        base = (result.get("served_baseline") or {}).get(ensemble)
        if base:
            entry["baseline_per_s"] = base["items_per_s"]
            entry["served_over_baseline"] = rate / base["items_per_s"]
        summary[ensemble] = entry
    load = served_.get("fuse_image_text_at_load")
    if load:
        summary["at_load"] = {k: load[k] for k in ("load_fraction", "items_per_s_offered", "requests", "p50_ms", "p95_ms", "p99_ms",
                                                   "p99_over_p50", "fusion_ms", "fusion_share_of_p50")}
    trim = result.get("text_trimming")
    if trim:
        summary["text_trim_speedup"] = trim["speedup"]
        summary["text_trim_max_abs_diff_fp32"] = trim["trimmed_vs_padded"]["fp32"]["max_abs_diff"]
    prec = result.get("precision") or {}
    for p in ("bf16", "fp16"):
        if p in prec:
            summary[f"{p}_min_cosine_vs_fp32"] = min(prec[p]["image_min_cosine_vs_fp32"], prec[p]["text_min_cosine_vs_fp32"])
            summary[f"{p}_image_speedup"] = prec[f"{p}_image_speedup"]
    ceiling = serving_ceiling(result)
    if ceiling:
        summary["ceiling"] = ceiling
    measured = result.get("ceiling_measured")
    if measured:
        entry = {"embed_image_per_s": measured["embed_image_per_s"],
                 "embed_image_over_limit": measured["embed_image_per_s"] / limit["embed_image_per_s"]}
        if "embed_image" in summary:
            entry["served_over_ceiling"] = summary["embed_image"]["served_per_s"] / measured["embed_image_per_s"]
        summary["ceiling_measured"] = entry
    if served_.get("outputs"):
        summary["served_min_cosine_vs_fp32"] = min(served_["outputs"]["image_min_cosine_vs_fp32_in_process"],
                                                   served_["outputs"]["text_min_cosine_vs_fp32_in_process"])
    return _jsonable(summary)


def serving_ceiling(result: dict[str, Any]) -> dict[str, Any] | None:
    """What embed_image could serve with no serving overhead at all: every core running the image tower
    in-process (one thread, the served precision) plus its image's decoding and resizing, nothing else.
    Against the limit, this bounds served/limit from above on this machine and these kernels."""
    limit, prec, pre = result.get("limit") or {}, result.get("precision") or {}, result.get("preprocessing") or {}
    cores = (result.get("machine") or {}).get("cores")
    one_thread = ((result.get("peak") or {}).get(limit.get("dtype")) or {}).get("one_thread_gflops")
    tower = prec.get(result.get("served_precision") or limit.get("dtype")) or {}  # the tower as served
    if not (cores and one_thread and tower.get("image_per_s") and prec.get("threads") == 1 and pre.get("per_image")):
        return None
    draft = bool(result.get("served_jpeg_draft"))
    engine = result.get("served_engine") or "torch"
    rate = tower.get("image_openvino_per_s") if engine == "openvino" else tower["image_per_s"]
    if not rate:
        return None
    tower_ms = 1e3 / rate
    pre_ms = pre["per_image"]["jpeg_draft_path_ms" if draft else "exact_path_ms"]
    per_core = 1e3 / (tower_ms + pre_ms)
    return {"tower_ms_per_image": tower_ms, "preprocess_ms_per_image": pre_ms, "jpeg_draft": draft, "engine": engine,
            "tower_over_one_thread_peak": rate * result["flops"]["image_flops"] / 1e9 / one_thread,
            "embed_image_per_s": per_core * cores, "embed_image_over_limit": per_core * cores / limit["embed_image_per_s"]}


def _f(value, fmt: str = ".1f", suffix: str = "") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return f"{value:{fmt}}{suffix}"


def table(result: dict[str, Any]) -> str:
    """The printed report: limit, served, naive, ratios, latency, fusion share, and the optimisations' figures."""
    m, peak, flops, limit = result["machine"], result["peak"], result["flops"], result["limit"]
    s = result["summary"]
    served_ = result.get("served") or {}
    lines = [
        f"mmfuse bench: {result['options']['model']}, profile '{result['options']['profile']}', "
        f"{m['cpu']} ({m['cores']} cores; bf16 matrix units: {'yes' if m['bf16_matrix_units'] else 'no'}), "
        f"load average {result['load_average_start']} -> {result.get('load_average_end')}",
        "",
        "| limit | |",
        "| --- | --- |",
    ]
    for dtype, p in peak.items():
        detail = (f" (all threads {p['all_threads_gflops']:.0f}, one thread {p['one_thread_gflops']:.0f} x {m['cores']})"
                  if "all_threads_gflops" in p else "")
        lines.append(f"| peak matmul {dtype} | {p['peak_gflops']:.0f} GFLOP/s{detail} |")
    lines += [
        f"| FLOPs per image | {flops['image_flops'] / 1e9:.3f} GFLOP (torch flop counter: {flops['image_flops_counted'] / 1e9:.3f}, "
        "without the attention products) |",
        f"| FLOPs per caption | {flops['text_flops'] / 1e9:.3f} GFLOP at {flops['text_tokens']} tokens "
        f"({flops['text_flops_padded'] / 1e9:.2f} padded to {flops['context_length']}) |",
        f"| limit used | {limit['dtype']}: {limit['why']} |",
        "",
    ]
    if not served_:
        lines.append("(served: not measured in this run)")
    lines += [] if not served_ else [
        "| ensemble | served items/s | limit items/s | served/limit | naive items/s | served/naive | baseline items/s | "
        "served/baseline | p50 ms | p95 ms | p99 ms | server cores |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for ensemble in ("embed_image", "fuse_image_text", "embed_text"):
        e = s.get(ensemble)
        if not e:
            continue
        r = served_[ensemble]
        lines.append(
            f"| {ensemble} | {e['served_per_s']:.1f} | {e['limit_per_s']:.1f} | {e['served_over_limit']:.2f} | "
            f"{_f(e.get('naive_per_s'))} | {_f(e.get('served_over_naive'), '.1f', 'x')} | {_f(e.get('baseline_per_s'))} | "
            f"{_f(e.get('served_over_baseline'), '.1f', 'x')} | {r['p50_ms']:.0f} | {r['p95_ms']:.0f} | {r['p99_ms']:.0f} | "
            f"{_f(r.get('server_cpu_cores'), '.2f')} |")
    normalised = [f"{name} {s[name]['load_normalised_served_over_limit']:.2f}" for name in ("embed_image", "fuse_image_text", "embed_text")
                  if "load_normalised_served_over_limit" in s.get(name, {})]
    if normalised:
        lines.append("served/limit if the server had had the whole machine (served per server core x cores; an "
                     "estimate for shared machines): " + ", ".join(normalised))
    c = s.get("ceiling")
    if c:
        lines.append(f"ceiling with no serving overhead (in-process, one thread per core): image tower ({c.get('engine', 'torch')}) "
                     f"{c['tower_ms_per_image']:.1f} ms "
                     f"({c['tower_over_one_thread_peak']:.0%} of the one-thread matmul peak) + "
                     f"{'jpeg_draft' if c['jpeg_draft'] else 'exact'} decoding and resizing {c['preprocess_ms_per_image']:.1f} ms "
                     f"per image = {c['embed_image_per_s']:.1f} img/s on {m['cores']} cores = {c['embed_image_over_limit']:.2f} "
                     "of the limit")
    cm, raw = s.get("ceiling_measured"), result.get("ceiling_measured")
    if cm and raw:
        lines.append(f"ceiling measured: {raw['workers']} processes at once, each decoding and encoding batches of "
                     f"{raw['batch']} in one thread ({raw['engine']}, {raw['precision']}, "
                     f"{'jpeg_draft' if raw['jpeg_draft'] else 'exact'} decoding), no server: "
                     f"{cm['embed_image_per_s']:.1f} img/s = {cm['embed_image_over_limit']:.2f} of the limit"
                     + (f"; served embed_image = {cm['served_over_ceiling']:.2f} of it" if "served_over_ceiling" in cm else ""))
    plan = result["options"]["plan"]
    if served_:
        lines.append(f"(closed loop: {plan['concurrency']} requests in flight of {plan['rows']} rows, "
                     f"{plan['duration_s']:.0f} s after {plan['warmup_s']:.0f} s warm-up; loopback gRPC; server cores: "
                     f"CPU time of tritonserver and its model processes per second, of {m['cores']})")
    if "at_load" in s:
        a = s["at_load"]
        lines += ["", f"fuse_image_text at {a['load_fraction']:.0%} of its peak ({a['items_per_s_offered']:.1f} items/s, "
                      f"fixed rate, {a.get('requests', 0):.0f} requests measured): p50 {a['p50_ms']:.0f} ms, p95 {a['p95_ms']:.0f} ms, p99 {a['p99_ms']:.0f} ms, "
                      f"p99/p50 {a['p99_over_p50']:.2f}; fusion step {a['fusion_ms']:.2f} ms per request = "
                      f"{a['fusion_share_of_p50']:.1%} of p50"]
        models = served_["fuse_image_text_at_load"]["models"]
        lines += ["", "| model (at load) | requests | queue ms | compute ms | mean batch rows |", "| --- | --- | --- | --- | --- |"]
        for name in ("fuse_image_text", "image_preprocess", "image_encoder", "text_preprocess", "text_encoder", "fusion"):
            if name in models:
                r = models[name]
                compute = r["compute_input_ms"] + r["compute_infer_ms"] + r["compute_output_ms"]
                lines.append(f"| {name} | {r['requests']:.0f} | {r['queue_ms']:.1f} | {compute:.1f} | {_f(r['mean_batch_rows'])} |")
    t = result.get("text_trimming")
    if t:
        lines += ["", f"text trimming ({t['precision']}, batch {t['batch']}, captions of {t['mean_tokens']:.1f} tokens on "
                      f"average, longest {t['longest_tokens']} of {t['context_length']}): trimmed {t['trimmed_per_s']:.0f}/s vs "
                      f"padded {t['padded_per_s']:.0f}/s = {t['speedup']:.1f}x; trimmed vs padded max |diff| fp32 "
                      f"{t['trimmed_vs_padded']['fp32']['max_abs_diff']:.1e}"]
    p = result.get("precision")
    if p:
        parts = []
        for prec in ("fp32", "bf16", "fp16"):
            if prec in p:
                r = p[prec]
                parts.append(f"{prec}: image {r['image_per_s']:.1f}/s text {r['text_per_s']:.0f}/s, cosine vs fp32 >= "
                             f"{min(r['image_min_cosine_vs_fp32'], r['text_min_cosine_vs_fp32']):.4f}"
                             + (f" (engine openvino: image {r['image_openvino_per_s']:.1f}/s, cosine vs torch fp32 >= "
                                f"{r['image_openvino_min_cosine_vs_fp32']:.4f}"
                                + (f"; text {r['text_openvino_per_s']:.0f}/s, cosine >= "
                                   f"{r['text_openvino_min_cosine_vs_fp32']:.4f}" if "text_openvino_per_s" in r else "")
                                + ")" if "image_openvino_per_s" in r else ""))
        lines += ["", f"precision (in-process, batch {p['batch']}, {p['threads']} thread(s), {p['device']}): " + "; ".join(parts)]
    g = result.get("tower_gemm")
    if p and g and g["dtype"] in p and "one_thread_gflops" in peak.get(g["dtype"], {}):
        one = peak[g["dtype"]]["one_thread_gflops"]
        achieved = p[g["dtype"]]["image_per_s"] * flops["image_flops"] / 1e9 / p["threads"]
        lines.append(f"image tower {g['dtype']}, one thread: {achieved:.0f} GFLOP/s in-process (batch {p['batch']}) = "
                     f"{achieved / one:.0%} of the one-thread peak {one:.0f}; its own matmul shapes alone (M = "
                     f"{g['batch']}x{g['tokens']}) run at {g['gflops']:.0f} GFLOP/s = {g['gflops'] / one:.0%}")
    e = result.get("encoder_steps")
    if e and "patch_embedding_conv_ms" in e:
        lines.append(f"image encoder steps ({e['precision']}, batch {e['batch']}, one thread): patch embedding as a "
                     f"convolution {e['patch_embedding_conv_ms']:.1f} ms -> as one matmul {e['patch_embedding_matmul_ms']:.1f} ms; "
                     f"tower with the token sequence converted {e['tower_with_sequence_ms']:.0f} ms -> embedding only "
                     f"{e['tower_embedding_only_ms']:.0f} ms")
    if "served_min_cosine_vs_fp32" in s:
        decoding = "jpeg_draft" if result.get("served_jpeg_draft") else "exact"
        lines.append(f"served embeddings ({served_['outputs']['served_precision']}, {decoding} decoding) vs in-process fp32 "
                     f"with exact decoding: cosine >= "
                     f"{s['served_min_cosine_vs_fp32']:.5f}")
    pre = result.get("preprocessing")
    if pre:
        st = pre["per_image"]
        lines += ["", f"preprocessing per {pre['image_size'][0]}x{pre['image_size'][1]} JPEG ({pre['encoded_kb']} KB), one "
                      f"thread: decode {st['decode_ms']:.2f} ms, resize+crop {st['resize_crop_ms']:.2f} ms, ToTensor+Normalize "
                      f"{st['to_tensor_normalize_ms']:.2f} ms (lookup table {st['lookup_table_tail_ms']:.2f} ms); whole: "
                      f"open_clip transform {st['open_clip_transform_path_ms']:.2f} ms, exact path {st['exact_path_ms']:.2f} ms "
                      f"(max |diff| {pre['exact_vs_open_clip_max_abs']:.0e}), jpeg_draft {st['jpeg_draft_path_ms']:.2f} ms "
                      f"(mean |diff| {pre['draft_vs_exact_mean_abs']:.4f}, max {pre['draft_vs_exact_max_abs']:.3f}, "
                      f"normalised units; embedding cosine vs exact >= {_f(pre.get('draft_vs_exact_embedding_min_cosine'), '.5f')}); handler images/s by decode threads: "
                      + ", ".join(f"{k}: {v:.0f}" for k, v in pre["handler_images_per_s_by_decode_threads"].items())]
        enc = (served_.get("embed_image") or {}).get("models", {})
        if "image_preprocess" in enc and "image_encoder" in enc:
            pre_ms = enc["image_preprocess"]["compute_infer_ms"]
            enc_ms = enc["image_encoder"]["compute_infer_ms"]
            lines.append(f"served embed_image: image_preprocess compute {pre_ms:.1f} ms vs image_encoder {enc_ms:.1f} ms "
                         f"per request ({pre_ms / enc_ms:.0%})")
    n = result.get("naive")
    if n:
        lines += ["", f"naive loop: open_clip fp32, one item at a time, {n['items']} items, the faster of torch's default "
                      f"{n['default_threads']} threads and 1 thread: embed_image " + ", ".join(
                          f"{k} thread(s) {v:.1f}/s" for k, v in n["embed_image_per_s_by_threads"].items())]
    lines.append(f"({result['seconds']:.0f} s; machine {m['host']}, {m['time_utc']})")
    return _paragraphs(lines)


def _paragraphs(lines: list[str]) -> str:
    """Markdown: a blank line between paragraphs and around tables, none inside a table."""
    out: list[str] = []
    for line in lines:
        if line and out and out[-1] and not (line.startswith("|") and out[-1].startswith("|")):
            out.append("")
        if line or (out and out[-1]):
            out.append(line)
    return "\n".join(out)


def write_json(result: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_jsonable(result), indent=2, sort_keys=False) + "\n")


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
    print(json.dumps(_jsonable({k: result.get(k) for k in ("machine", "peak", "limit", "summary", "precision",
                                                            "text_trimming", "profile_handlers")}), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main_gpu())
