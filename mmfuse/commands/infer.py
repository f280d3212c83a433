"""mmfuse infer --image FILE --text STR [--url HOST:PORT]"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np


def register(sub) -> None:
    p = sub.add_parser("infer", help="fuse one image and one text on a running server and print the result")
    p.add_argument("--image", help="image file (omit for a text-only request)")
    p.add_argument("--text", help="text (omit for an image-only request)")
    p.add_argument("--url", default="127.0.0.1:8001", help="gRPC HOST:PORT")
    p.add_argument("--timeout", type=float, default=30.0, help="deadline in seconds")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=run)


def _summary(vector: np.ndarray, k: int = 4) -> str:
    head = ", ".join(f"{x:+.4f}" for x in vector[:k])
    return f"[{head}, ...] (dim {vector.shape[-1]}, norm {np.linalg.norm(vector):.3f})"


def run(args: argparse.Namespace) -> int:
    from mmfuse.clients import MMFuseClient, MMFuseClientError

    if not args.image and not args.text:
        print("mmfuse infer: give --image, --text or both", file=sys.stderr)
        return 2
    image = b""
    if args.image:
        path = Path(args.image)
        if not path.is_file():
            print(f"mmfuse infer: image file {path} not found", file=sys.stderr)
            return 2
        image = path.read_bytes()
    try:
        with MMFuseClient(args.url, timeout_s=args.timeout) as client:
            result = client.fuse_image_text([image], [args.text or ""])
    except MMFuseClientError as error:
        print(f"mmfuse infer: {error}", file=sys.stderr)
        return 1
    mask = {"image": bool(result.mask[0, 0]), "text": bool(result.mask[0, 1])}
    status = {"image": result.status[0][0], "text": result.status[0][1]}
    if args.json:
        print(json.dumps({"fused": result.fused[0].tolist(), "modality_mask": mask, "modality_status": status}))
    else:
        print(f"fused           {_summary(result.fused[0])}")
        print(f"modality_mask   image={mask['image']} text={mask['text']}")
        print(f"modality_status image={status['image']} text={status['text']}")
    return 0
