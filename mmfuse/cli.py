"""The ``mmfuse`` command.

    mmfuse serve [--model-repository DIR] [--grpc-port N --http-port N --metrics-port N]
    mmfuse infer --image FILE --text STR [--url HOST:PORT]
    mmfuse demo
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from .server import DEFAULT_MODEL_REPOSITORY, ServerConfig, ServerError


def _cmd_serve(args: argparse.Namespace) -> int:
    from .server import serve_foreground

    repo = Path(args.model_repository)
    if not repo.is_dir():
        print(f"mmfuse serve: model repository {repo} is not a directory", file=sys.stderr)
        return 2
    config = ServerConfig(
        model_repository=repo,
        grpc_port=args.grpc_port,
        http_port=args.http_port,
        metrics_port=args.metrics_port,
        model_control_mode=args.model_control_mode,
        log_verbose=args.log_verbose,
    )
    try:
        return serve_foreground(config)
    except ServerError as error:
        print(f"mmfuse serve: {error}", file=sys.stderr)
        return 1


def _summary(vector: np.ndarray, k: int = 4) -> str:
    head = ", ".join(f"{x:+.4f}" for x in vector[:k])
    return f"[{head}, ...] (dim {vector.shape[-1]}, norm {np.linalg.norm(vector):.3f})"


def _cmd_infer(args: argparse.Namespace) -> int:
    from clients import MMFuseClient, MMFuseClientError

    image = b""
    if args.image:
        path = Path(args.image)
        if not path.is_file():
            print(f"mmfuse infer: image file {path} not found", file=sys.stderr)
            return 2
        image = path.read_bytes()
    text = args.text or ""
    try:
        with MMFuseClient(args.url, timeout_s=args.timeout) as client:
            result = client.fuse_image_text([image], [text])
    except MMFuseClientError as error:
        print(f"mmfuse infer: {error}", file=sys.stderr)
        return 1
    payload = {
        "fused": result.fused[0].tolist(),
        "modality_mask": {"image": bool(result.mask[0, 0]), "text": bool(result.mask[0, 1])},
        "modality_status": {"image": result.status[0][0], "text": result.status[0][1]},
    }
    if args.json:
        print(json.dumps(payload))
    else:
        print(f"fused           {_summary(result.fused[0])}")
        print(f"modality_mask   image={payload['modality_mask']['image']} text={payload['modality_mask']['text']}")
        print(f"modality_status image={payload['modality_status']['image']} text={payload['modality_status']['text']}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(Path(args.model_repository))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mmfuse", description="Multimodal fusion on NVIDIA Triton")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run tritonserver on the model repository (foreground; SIGTERM stops it)")
    serve.add_argument("--model-repository", default=str(DEFAULT_MODEL_REPOSITORY))
    serve.add_argument("--grpc-port", type=int, default=8001)
    serve.add_argument("--http-port", type=int, default=8000)
    serve.add_argument("--metrics-port", type=int, default=8002)
    serve.add_argument("--model-control-mode", choices=("none", "explicit", "poll"), default="none")
    serve.add_argument("--log-verbose", type=int, default=0)
    serve.set_defaults(func=_cmd_serve)

    infer = sub.add_parser("infer", help="fuse one image and one text on a running server and print the result")
    infer.add_argument("--image", help="image file (omit for a text-only request)")
    infer.add_argument("--text", help="text (omit for an image-only request)")
    infer.add_argument("--url", default="127.0.0.1:8001", help="gRPC HOST:PORT")
    infer.add_argument("--timeout", type=float, default=30.0, help="deadline in seconds")
    infer.add_argument("--json", action="store_true", help="print JSON")
    infer.set_defaults(func=_cmd_infer)

    demo = sub.add_parser("demo", help="start the embedded server, send real requests, print results, stop")
    demo.add_argument("--model-repository", default=str(DEFAULT_MODEL_REPOSITORY))
    demo.set_defaults(func=_cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "infer" and not args.image and not args.text:
        print("mmfuse infer: give --image, --text or both", file=sys.stderr)
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
