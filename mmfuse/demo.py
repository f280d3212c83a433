"""``mmfuse demo``: start the embedded tritonserver, send real requests, print results, stop."""
from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from .images import shape_image
from .server import ServerConfig, ServerError, TritonServer


def run_demo(model_repository: Path) -> int:
    from clients import MMFuseClient

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
        images = [shape_image("red", "circle"), shape_image("blue", "square", fmt="JPEG"),
                  b"\xff\xd8\xff\xe0 this is not a JPEG", b""]
        names = ["red circle (PNG)", "blue square (JPEG)", "corrupt JPEG bytes", "(no image)"]
        texts = ["a red circle", "a blue square", "a green triangle", "a purple circle"]
        with MMFuseClient(server.grpc_url, timeout_s=30) as client:
            t0 = time.perf_counter()
            fused = client.fuse_image_text(images, texts)
            t_fuse = time.perf_counter() - t0
            img = client.embed_image(images)
            txt = client.embed_text(texts + ["", b"\xff\xfe not UTF-8"])
        print(f"fuse_image_text: batch of {len(images)} in {1e3 * t_fuse:.1f} ms")
        print(f"{'image':<22} {'text':<20} {'mask(img,txt)':<14} {'status(img,txt)':<26} fused[:3]")
        for i in range(len(images)):
            mask = f"{int(fused.mask[i, 0])},{int(fused.mask[i, 1])}"
            status = ",".join(fused.status[i])
            head = " ".join(f"{x:+.3f}" for x in fused.fused[i, :3])
            print(f"{names[i]:<22} {texts[i]:<20} {mask:<14} {status:<26} {head}")
        print("\nembed_image VALID/STATUS:", list(zip(img.valid.tolist(), img.status)))
        print("embed_text  VALID/STATUS:", list(zip(txt.valid.tolist(), txt.status)))
        sims = img.embedding[:2] @ txt.embedding[:4].T
        print("\ncosine(image, text) for the two valid images x four captions:")
        print(np.array2string(sims, precision=3, suppress_small=True))
        print("\n(The shipped repository serves the tiny test architecture with seeded random weights:"
              " similarities are not meaningful until real weights are configured. See README.)")
    finally:
        code = server.stop()
        print(f"\nServer stopped (exit code {code}).")
    return 0
