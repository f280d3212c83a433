"""mmfuse demo: start the embedded server, send real requests, print results, stop."""
from __future__ import annotations

import argparse
from pathlib import Path

from ..paths import DEFAULT_MODEL_REPOSITORY


def register(sub) -> None:
    p = sub.add_parser("demo", help="start the embedded server, send real requests, print results, stop")
    p.add_argument("--model-repository", default=str(DEFAULT_MODEL_REPOSITORY))
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..demo import run_demo

    return run_demo(Path(args.model_repository))
