"""``mmfuse demo``: start the embedded tritonserver, send real requests, print results, stop."""
from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from . import shapes
from .server import ServerConfig, ServerError, TritonServer


def _captions_with_scores(client) -> None:
    """Fresh benchmark images, each with a true caption and the two kinds of false ones."""
    rng = np.random.default_rng(int(time.time()))
    rows = []
    for _ in range(3):
        example = shapes.make_example(rng, "positive")
        a, b = example.objects
        relation = example.caption[len(a.phrase()) + 1 : -len(b.phrase()) - 1]
        swapped = shapes.caption(b, relation, a)
        attribute = shapes._attribute_negative(rng, a, relation, b)
        image = shapes.png_bytes(example.image)
        rows += [(image, example.caption, "true"), (image, swapped, "objects swapped"),
                 (image, attribute, "attribute changed")]
    result = client.fuse_image_text([r[0] for r in rows], [r[1] for r in rows])
    if result.score is None:
        print("(fuse_image_text has no SCORE: the served fusion strategy has no trained task head)")
        return
    print("Does the caption match the image? (fresh images: two shapes on white, 64x64)")
    print(f"{'caption':<46} {'kind':<18} SCORE")
    for i, (_, text, kind) in enumerate(rows):
        if i % 3 == 0 and i:
            print()
        print(f"{text:<46} {kind:<18} {result.score[i]:.3f}")


def run_demo(model_repository: Path) -> int:
    from mmfuse.clients import MMFuseClient

    log = Path(tempfile.gettempdir()) / "mmfuse-demo-tritonserver.log"
    config = ServerConfig.on_free_ports(model_repository=model_repository)
    print(f"Starting tritonserver on gRPC :{config.grpc_port} (repository {model_repository}; log {log}) ...")
    started = time.monotonic()
    try:
        server = TritonServer(config, log_path=log)
        server.__enter__()
    except ServerError as error:
        print(f"demo: {error}", file=sys.stderr)
        return 1
    try:
        print(f"Server ready in {time.monotonic() - started:.1f} s.\n")
        with MMFuseClient(server.grpc_url, timeout_s=30) as client:
            _captions_with_scores(client)
            example = shapes.make_example(np.random.default_rng(1), "positive")
            good = shapes.png_bytes(example.image)
            images = [good, good[: len(good) // 2], b"\xff\xd8\xff\xe0 this is not a JPEG", b"", good]
            names = ["shapes (PNG)", "truncated PNG", "garbage bytes", "(no image)", "shapes (PNG)"]
            texts = [example.caption, example.caption, example.caption, example.caption, ""]
            t0 = time.perf_counter()
            fused = client.fuse_image_text(images, texts)
            elapsed = time.perf_counter() - t0
            txt = client.embed_text(["a red circle", "", b"\xff\xfe not UTF-8"])
        print(f"\nGraceful degradation: fuse_image_text, a batch of {len(images)} in {1e3 * elapsed:.1f} ms")
        print(f"{'image':<16} {'text':<12} {'mask(img,txt)':<14} {'status(img,txt)':<24} {'SCORE':<6} fused[:3]")
        for i in range(len(images)):
            mask = f"{int(fused.mask[i, 0])},{int(fused.mask[i, 1])}"
            status = ",".join(fused.status[i])
            score = f"{fused.score[i]:.3f}" if fused.score is not None else "-"
            head = " ".join(f"{x:+.3f}" for x in fused.fused[i, :3])
            text = "(caption)" if texts[i] else "(no text)"
            print(f"{names[i]:<16} {text:<12} {mask:<14} {status:<24} {score:<6} {head}")
        print("\nembed_text VALID/STATUS for 'a red circle', '', invalid UTF-8:",
              list(zip(txt.valid.tolist(), txt.status)))
    finally:
        code = server.stop()
        print(f"\nServer stopped (exit code {code}).")
    return 0
