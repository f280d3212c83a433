"""mmfuse serve [--model-repository DIR] [--grpc-port N --http-port N --metrics-port N]"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..paths import DEFAULT_MODEL_REPOSITORY
from ..server import ServerConfig, ServerError, TLSConfig, serve_foreground


def register(sub) -> None:
    p = sub.add_parser("serve", help="run tritonserver on the model repository (foreground; SIGTERM stops it)")
    p.add_argument("--model-repository", default=str(DEFAULT_MODEL_REPOSITORY),
                   help="the model repository (default ./model_repository; `mmfuse init DIR` writes one)")
    p.add_argument("--grpc-port", type=int, default=8001)
    p.add_argument("--http-port", type=int, default=8000)
    p.add_argument("--metrics-port", type=int, default=8002)
    p.add_argument("--model-control-mode", choices=("none", "explicit", "poll"), default="none",
                   help="explicit: models can be reloaded live through the repository API")
    p.add_argument("--log-verbose", type=int, default=0)
    p.add_argument("--no-watchdog", action="store_true",
                   help="do not watch for dead python-model processes (docs/operations.md, 'The watchdog')")
    p.add_argument("--response-cache-mb", type=float, default=0.0,
                   help="Triton's local response cache, in MiB (default 0: off); only models whose config.pbtxt has "
                        "`response_cache { enable: true }` use it (docs/operations.md, 'Response cache')")
    p.add_argument("--tls-cert", help="gRPC TLS: server certificate (PEM)")
    p.add_argument("--tls-key", help="gRPC TLS: server private key (PEM)")
    p.add_argument("--tls-ca", help="gRPC TLS: CA certificate (PEM) that signs client certificates")
    p.add_argument("--tls-mutual", action="store_true", help="require client certificates (mutual TLS)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    repo = Path(args.model_repository)
    if not repo.is_dir():
        print(f"mmfuse serve: model repository {repo} is not a directory: pass --model-repository DIR, or write one "
              "with `mmfuse init DIR --model NAME --pretrained TAG_OR_FILE`", file=sys.stderr)
        return 2
    tls = None
    if args.tls_cert or args.tls_key:
        if not (args.tls_cert and args.tls_key):
            print("mmfuse serve: --tls-cert and --tls-key go together", file=sys.stderr)
            return 2
        tls = TLSConfig(Path(args.tls_cert), Path(args.tls_key), Path(args.tls_ca) if args.tls_ca else None,
                        args.tls_mutual)
    if args.response_cache_mb < 0:
        print("mmfuse serve: --response-cache-mb must be >= 0", file=sys.stderr)
        return 2
    config = ServerConfig(
        model_repository=repo,
        grpc_port=args.grpc_port,
        http_port=args.http_port,
        metrics_port=args.metrics_port,
        model_control_mode=args.model_control_mode,
        log_verbose=args.log_verbose,
        tls=tls,
        response_cache_bytes=int(args.response_cache_mb * 2**20),
    )
    try:
        return serve_foreground(config, watchdog=not args.no_watchdog)
    except ServerError as error:
        print(f"mmfuse serve: {error}", file=sys.stderr)
        return 1
