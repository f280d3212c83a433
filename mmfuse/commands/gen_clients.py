"""mmfuse gen-clients [--model-repository DIR] [--out DIR] [--check]"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..paths import DEFAULT_MODEL_REPOSITORY


def register(sub) -> None:
    p = sub.add_parser("gen-clients", help="write a typed Python client per ensemble of the model repository "
                                           "into clients/ (--check: fail if they are stale)")
    p.add_argument("--model-repository", default=str(DEFAULT_MODEL_REPOSITORY))
    p.add_argument("--out", default="clients", help="the clients package folder (default: ./clients)")
    p.add_argument("--check", action="store_true",
                   help="write nothing; exit 1 and show the differences if the generated files are stale")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..codegen import CodegenError, sync

    repo, out = Path(args.model_repository), Path(args.out)
    if not repo.is_dir():
        print(f"mmfuse gen-clients: model repository {repo} is not a directory", file=sys.stderr)
        return 2
    try:
        report = sync(repo, out, check=args.check)
    except (CodegenError, ValueError) as error:
        print(f"mmfuse gen-clients: {error}", file=sys.stderr)
        return 2
    if args.check:
        if not report.stale:
            print(f"{out}: {len(report.unchanged)} generated files up to date with {repo}")
            return 0
        for diff in report.diffs:
            sys.stdout.write(diff)
        for name in report.removed:
            print(f"{out / name}: generated for an ensemble that is no longer in {repo}")
        stale = ", ".join(report.written + report.removed)
        print(f"mmfuse gen-clients --check: {out} is stale against {repo} ({stale}); "
              "run `mmfuse gen-clients` and commit the result", file=sys.stderr)
        return 1
    for name in report.written:
        print(f"wrote   {out / name}")
    for name in report.removed:
        print(f"removed {out / name}")
    print(f"{len(report.written)} written, {len(report.removed)} removed, {len(report.unchanged)} unchanged")
    return 0
