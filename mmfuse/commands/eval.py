"""mmfuse eval: robustness (imperfections, modality dropout) and performance under load, as a report.

    mmfuse eval --out DIR                       # starts the embedded server (explicit model control)
    mmfuse eval --out DIR --url 127.0.0.1:8001  # a running server on this machine (explicit mode to switch heads)
    mmfuse eval --out DIR --quick               # a small run (the e2e test's size)
    mmfuse eval --data TEST.jsonl --out DIR     # on your own rows (task and classes of the served heads)
    mmfuse eval --out DIR --load-generator python  # load runs by mmfuse's asyncio client instead of perf_analyzer
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from ..paths import DEFAULT_MODEL_REPOSITORY

if TYPE_CHECKING:
    from ..eval.runner import EvalConfig


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(x) for x in text.split(",") if x.strip())


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x.strip())


def register(sub) -> None:
    from ..eval.corruptions import CORRUPTIONS

    p = sub.add_parser("eval", help="evaluate robustness and performance under load; write a report "
                                    "(Markdown, PNG plots, JSON)")
    p.add_argument("--out", required=True, help="report folder (report.md, report.json, *.png, scores.npz)")
    p.add_argument("--url", help="gRPC HOST:PORT of a running server on this machine (default: start the embedded "
                                 "server on --model-repository)")
    p.add_argument("--model-repository", default=str(DEFAULT_MODEL_REPOSITORY),
                   help="repository whose fusion version folders hold the trained heads (and that the embedded "
                        "server serves)")
    p.add_argument("--heads", nargs="*", default=[], help="more head folders (fusion_head.json + .safetensors)")
    p.add_argument("--data", help="a JSONL/CSV manifest of your own rows (image, text, label): evaluate the heads whose "
                                  "task and classes match it on these rows instead of the shapes benchmark")
    p.add_argument("--task", choices=("classify", "match"), help="the task of --data (default: the served head's)")
    p.add_argument("--max-rows", type=int, help="--data: at most this many rows, a seeded subset taking the classes in "
                                                "turn (default 200; quick 24; 0 = every row)")
    p.add_argument("--quick", action="store_true", help="small sizes: 4 rows per kind (--data: 24 rows), levels 0, 0.5, "
                                                        "1, short load runs")
    p.add_argument("--per-kind", type=int, help="evaluation rows per kind (default 24; quick 4)")
    p.add_argument("--levels", type=_floats, help="imperfection levels, comma-separated (default 0,0.1,...,1)")
    p.add_argument("--corruptions", nargs="+", choices=list(CORRUPTIONS), help="default: all")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ensembles", nargs="+", help="ensembles to load (default: every served ensemble)")
    p.add_argument("--concurrencies", type=_ints, help="closed-loop concurrencies (default 1,4,8; quick 1,4)")
    p.add_argument("--rates", type=_floats, help="open-loop request rates per second (default: 25, 50 and 90 %% of "
                                                "the best closed-loop throughput)")
    p.add_argument("--load-requests", type=int, help="at most this many requests per load run (default 300)")
    p.add_argument("--load-seconds", type=float, help="at most this long per load run, in seconds (default 2)")
    p.add_argument("--load-generator", choices=("perf_analyzer", "python"), default="perf_analyzer",
                   help="what loads the load runs: Triton's perf_analyzer (default; from the tritonclient wheel) or "
                        "mmfuse's asyncio Python client")
    p.add_argument("--no-robustness", action="store_true", help="performance only")
    p.add_argument("--no-load", action="store_true", help="robustness only")
    p.set_defaults(func=run)


def config_from_args(args: argparse.Namespace) -> EvalConfig:
    """The EvalConfig that ``args`` (this command's parsed options) ask for (``--quick``: its small defaults)."""
    from ..eval.runner import EvalConfig

    values = {"out": Path(args.out), "url": args.url, "repository": Path(args.model_repository),
              "heads": [Path(h) for h in args.heads], "seed": args.seed,
              "robustness": not args.no_robustness, "load": not args.no_load,
              "data": Path(args.data) if args.data else None, "task": args.task,
              "load_generator": args.load_generator}
    if args.max_rows is not None:
        values["max_rows"] = args.max_rows
    optional = {"per_kind": args.per_kind, "levels": args.levels, "corruptions": tuple(args.corruptions or ()),
                "ensembles": tuple(args.ensembles or ()), "concurrencies": args.concurrencies, "rates": args.rates,
                "load_requests": args.load_requests, "load_seconds": args.load_seconds}
    values.update({k: v for k, v in optional.items() if v})
    return EvalConfig.quick_defaults(**values) if args.quick else EvalConfig(**values)


def run(args: argparse.Namespace) -> int:
    from ..eval.runner import run as run_eval

    cfg = config_from_args(args)
    if args.task and not args.data:
        print("mmfuse eval: --task is the task of --data", file=sys.stderr)
        return 2
    if cfg.max_rows < 0:
        print("mmfuse eval: --max-rows must be 0 (every row) or positive", file=sys.stderr)
        return 2
    if cfg.data is not None and not cfg.data.is_file():
        print(f"mmfuse eval: {cfg.data}: no such manifest file", file=sys.stderr)
        return 2
    if cfg.per_kind < 1 or cfg.load_requests < 1 or cfg.load_seconds <= 0 or min(cfg.concurrencies) < 1:
        print("mmfuse eval: --per-kind, --load-requests, --load-seconds and --concurrencies must be positive",
              file=sys.stderr)
        return 2
    if any(not 0 <= p <= 1 for p in cfg.levels):
        print(f"mmfuse eval: levels must be in [0, 1], got {cfg.levels}", file=sys.stderr)
        return 2
    from ..datasets import DatasetError
    from ..perf_analyzer import PerfAnalyzerError
    from ..server import ServerError

    try:
        if cfg.load and cfg.load_generator == "perf_analyzer":  # before the server and the robustness runs
            from ..perf_analyzer import find_perf_analyzer, library_dir

            find_perf_analyzer()
            library_dir()
        run_eval(cfg, sys.argv[1:])
    except (ServerError, PerfAnalyzerError) as error:
        print(f"mmfuse eval: {error}", file=sys.stderr)
        return 1
    except DatasetError as error:
        print(f"mmfuse eval: {error}", file=sys.stderr)
        return 2
    return 0
