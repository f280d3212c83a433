"""In-process measurements, no server: the naive loop, preprocessing, the image encoder's steps, text trimming,
precision, the encoders built as a profile builds them, and the measured ceiling."""
from __future__ import annotations

import gc
import io
import os
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..wire import bytes_column
from .inputs import cosines, timed
from .served import PROFILES


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
                out["patch_embedding_conv_ms"] = 1e3 * timed(lambda: conv(x), seconds / 4, min_reps=2)
                out["patch_embedding_matmul_ms"] = 1e3 * timed(lambda: fast(x), seconds / 4, min_reps=2)
        out["tower_with_sequence_ms"] = 1e3 * timed(lambda: encoder.encode(pixels, sequence=True), seconds / 4, min_reps=1)
        out["tower_embedding_only_ms"] = 1e3 * timed(lambda: encoder.encode(pixels, sequence=False), seconds / 4, min_reps=1)
        return out
    finally:
        torch.set_num_threads(previous)




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
            "decode_ms": 1e3 * timed(lambda: exact.decode(data), per),
            "resize_crop_ms": 1e3 * timed(lambda: geometry(image), per),
            "to_tensor_normalize_ms": 1e3 * timed(lambda: legacy.transform.transforms[-1](
                legacy.transform.transforms[-2](resized)), per),
            "lookup_table_tail_ms": 1e3 * timed(lambda: exact._table[0][np.asarray(resized)[:, :, 0]], per),
            "open_clip_transform_path_ms": 1e3 * timed(lambda: legacy.preprocess_one(data), per),
            "exact_path_ms": 1e3 * timed(lambda: exact.preprocess_one(data), per),
            "jpeg_draft_path_ms": 1e3 * timed(lambda: draft.preprocess_one(data), per),
            "draft_decode_ms": 1e3 * timed(lambda: draft.decode(data), per),
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
        draft_cosine = float(cosines(tower.encode(np.stack(exact_pixels), sequence=False)[0],
                                      tower.encode(np.stack(draft_pixels), sequence=False)[0]).min())
        del tower
        column = bytes_column([images[i % len(images)] for i in range(batch)])
        threads = {}
        cores = os.cpu_count() or 1
        for n in [t for t in (1, 2, 4, 8, 16) if t <= max(2, cores)]:
            handler = ImagePreprocessor(spec, decode_threads=n)
            try:
                per_batch = timed(lambda h=handler: h({"IMAGE": column}, frozenset({"PIXELS"})), seconds / 4, min_reps=1)
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

            def run(trim: bool, encoder=encoder):
                encoder.trim = trim  # one model, both ways
                return encoder({"TOKENS": tokens}, embed)["EMBEDDING"]

            a, b = run(True), run(False)
            exactness[prec] = {"max_abs_diff": float(np.abs(a - b).max()), "min_cosine": float(cosines(a, b).min())}
            if prec == precision:
                out["trimmed_per_s"] = batch / timed(lambda: run(True), seconds / 2, min_reps=1)
                out["padded_per_s"] = batch / timed(lambda: run(False), seconds / 2, min_reps=1)
            del encoder
            gc.collect()
        out["trimmed_vs_padded"] = exactness
        out["speedup"] = out["trimmed_per_s"] / out["padded_per_s"]
        return out
    finally:
        torch.set_num_threads(previous)


def precision_cost(model_name: str, images: Sequence[bytes], captions: Sequence[str], precisions: Sequence[str],
                   seconds: float, batch: int = 16, threads: int = 1, device: str = "cpu",
                   bf16_units: bool = True) -> dict[str, Any]:
    """Throughput of each tower per precision (in-process handlers) and cosine of its embeddings vs fp32.
    Without bf16 units bf16 is measured on torch only (the emulated trap); OpenVINO would run it in fp32, or
    fail to compile where oneDNN is held below bf16."""
    import torch

    from mmfuse.serving.encoders import ImageEncoder, TextEncoder
    from mmfuse.serving.image_preprocess import ImagePreprocessor
    from mmfuse.serving.openclip_models import ClipSpec, load_tokenizer

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        pre = ImagePreprocessor(ClipSpec(model_name), decode_threads=1)
        column = bytes_column([images[i % len(images)] for i in range(batch)])
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
                if prec == "int8":
                    break  # int8 exists on OpenVINO only: measured below
                handler = handler_type(spec, device)
                emb = handler(feed, embed)["EMBEDDING"]
                if device.startswith("cuda"):
                    def call(h=handler, f=feed):
                        h(f, embed)
                        torch.cuda.synchronize()
                else:
                    def call(h=handler, f=feed):
                        h(f, embed)
                row[f"{tower}_per_s"] = batch / timed(call, seconds / 4, min_reps=1)
                if prec == "fp32":
                    reference[tower] = emb
                row[f"{tower}_min_cosine_vs_fp32"] = float(cosines(emb, reference[tower]).min())
                del handler
                gc.collect()
            if device == "cpu" and prec == "bf16" and not bf16_units:
                row["openvino"] = "not measured: no bf16 units (OpenVINO runs bf16 in fp32 there, or fails)"
            elif device == "cpu":  # the towers compiled by OpenVINO (engine openvino), same weights, same threads
                for tower, handler_type, feed in (("image", ImageEncoder, {"PIXELS": pixels}),
                                                  ("text", TextEncoder, {"TOKENS": tokens})):
                    handler = handler_type(spec, device, engine="openvino", threads=threads)
                    if prec == "int8":  # how long quantising took (or reading the cache) and its own check
                        row[f"{tower}_int8_quantisation"] = handler.openvino.int8_report.as_dict()
                    emb = handler(feed, embed)["EMBEDDING"]
                    row[f"{tower}_openvino_per_s"] = batch / timed(lambda h=handler, f=feed: h(f, embed),
                                                                    seconds / 4, min_reps=1)
                    row[f"{tower}_openvino_min_cosine_vs_fp32"] = float(cosines(emb, reference[tower]).min())
                    del handler
                    gc.collect()
            results[prec] = row
        for prec in precisions:
            if prec != "fp32":
                for tower in ("image", "text"):  # against fp32 on the same engine (int8: OpenVINO's fp32)
                    key = f"{tower}_per_s" if f"{tower}_per_s" in results[prec] else f"{tower}_openvino_per_s"
                    results[f"{prec}_{tower}_speedup"] = results[prec][key] / results["fp32"][key]
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
    pixels = pre({"IMAGE": bytes_column([images[i % len(images)] for i in range(batch)])}, frozenset({"PIXELS"}))["PIXELS"]
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

        def call(h=handler, f=feed, sync=sync):
            h(f, embed)
            sync()

        got = handler(feed, embed)["EMBEDDING"]
        rate = batch / timed(call, seconds, min_reps=2)
        del handler
        reference_type = handler_type(ClipSpec(model_name, allow_random_init=True, seed=0), "cpu")
        reference = reference_type(feed, embed)["EMBEDDING"]
        del reference_type
        out[model] = {"instance_kind": kind, "weights_device": str(weight.device), "weights_dtype": str(weight.dtype),
                      "items_per_s": rate, "min_cosine_vs_fp32_cpu": float(cosines(got, reference).min())}
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
        column, embed = bytes_column([images[i % len(images)] for i in range(batch)]), frozenset({"EMBEDDING"})
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




def single_image(model_name: str, precision: str, engine: str, draft: bool, images: Sequence[bytes], threads: int,
                 reps: int = 20) -> dict[str, Any]:
    """One image at a time, decoded and encoded in-process with ``threads`` threads (every core): the time a
    single request cannot beat on this machine; p50 over ``reps`` calls (embed_image's p50 at concurrency 1 is
    measured against it)."""
    import torch

    from mmfuse.serving.encoders import DecodingImageEncoder, ImageEncoder
    from mmfuse.serving.image_preprocess import ImagePreprocessor
    from mmfuse.serving.openclip_models import ClipSpec

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        handler = DecodingImageEncoder(
            ImagePreprocessor(ClipSpec(model_name), decode_threads=1, jpeg_draft=draft),
            ImageEncoder(ClipSpec(model_name, allow_random_init=True, seed=0, precision=precision), engine=engine,
                         threads=threads))
        embed, times = frozenset({"EMBEDDING"}), []
        for i in range(reps + 2):
            started = time.perf_counter()
            handler({"IMAGE": bytes_column([images[i % len(images)]])}, embed)
            if i >= 2:  # two warm-up calls
                times.append((time.perf_counter() - started) * 1000)
        handler.close()
        return {"engine": engine, "precision": precision, "threads": threads, "jpeg_draft": draft, "reps": reps,
                "p50_ms": float(np.percentile(times, 50)), "min_ms": float(min(times))}
    finally:
        torch.set_num_threads(previous)
