"""mmfuse init DIR --model NAME --pretrained TAG_OR_FILE [--profile auto|auto-latency|baseline|cpu|latency|gpu]
[--precision P] [--clients-out DIR]"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def register(sub) -> None:
    from ..profiles import PRECISIONS, profile_names

    p = sub.add_parser("init", help="write a complete model repository for any open_clip model (validated offline, "
                                    "with its generated clients)")
    p.add_argument("directory", help="the new repository (must not exist, or be empty)")
    p.add_argument("--model", required=True, help="open_clip architecture: ViT-B-32, ViT-L-14, ... or your own "
                                                  "with --model-config")
    p.add_argument("--pretrained", default="", help="an open_clip pretrained tag of the model (laion2b_s34b_b79k, "
                                                    "openai, ...) or a checkpoint file (copied into the repository)")
    p.add_argument("--profile", choices=profile_names(), default="auto",
                   help="serving settings: auto (default: detect this machine and pick; auto-latency for single "
                        "requests), baseline (fp32, one instance each; runs anywhere), cpu, latency, gpu (KIND_GPU, fp16)")
    p.add_argument("--precision", choices=PRECISIONS,
                   help="the encoders' precision instead of the profile's (int8: NNCF quantisation on OpenVINO)")
    p.add_argument("--model-config", type=Path, help="a JSON open_clip model config for --model (copied)")
    p.add_argument("--cache-dir", help="where the pretrained tag's weights are cached (default: the Hugging Face "
                                       "cache)")
    p.add_argument("--strategy", default="late", choices=("late", "early", "hybrid", "attention"),
                   help="fusion strategy (default late, no task head; others start untrained: `mmfuse train`)")
    p.add_argument("--allow-random-init", action="store_true",
                   help="serve random weights when --pretrained is empty (tests and benchmarks only)")
    p.add_argument("--clients-out", type=Path,
                   help="where to generate the repository's gRPC clients (default: DIRECTORY_clients beside it)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..codegen import sync
    from ..scaffold import InitError, init_repository

    target = Path(args.directory)
    try:
        init_repository(target, args.model, args.pretrained, args.profile, precision=args.precision,
                        model_config=args.model_config,
                        cache_dir=args.cache_dir, strategy=args.strategy,
                        allow_random_init=args.allow_random_init)
    except (InitError, ValueError) as error:
        print(f"mmfuse init: {error}", file=sys.stderr)
        return 2
    clients = args.clients_out or target.with_name(f"{target.name.replace('-', '_')}_clients")
    report = sync(target, clients)
    print_auto_choice(args.profile, args.precision)
    print(f"{target}: {args.model} ({args.pretrained or 'random weights'}), profile {args.profile!r}, fusion "
          f"{args.strategy!r}; validated offline")
    print(f"{clients}: {len(report.written) + len(report.unchanged)} generated client files")
    print(f"serve it: mmfuse serve --model-repository {target}")
    return 0


def print_auto_choice(profile: str, precision: str | None) -> None:
    """What ``auto`` detected and chose (nothing for a named profile)."""
    from ..auto import resolve
    from ..profiles import AUTO_PROFILES

    if profile in AUTO_PROFILES:
        for line in resolve(profile, precision).lines():
            print(line)
