"""mmfuse config-docs [--out FILE] [--check]: docs/configuration.md, generated from the handlers."""
from __future__ import annotations

import argparse
import difflib
import sys
from pathlib import Path


def register(sub) -> None:
    p = sub.add_parser("config-docs", help="write the handlers' parameter reference (docs/configuration.md) from "
                                           "the handlers themselves (--check: fail if it is stale)")
    p.add_argument("--out", default="docs/configuration.md", help="the Markdown file (default docs/configuration.md)")
    p.add_argument("--check", action="store_true", help="write nothing; exit 1 with a diff if the file is stale")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..configdoc import problems, render

    issues = problems()
    for issue in issues:
        print(f"mmfuse config-docs: {issue}", file=sys.stderr)
    text, out = render(), Path(args.out)
    old = out.read_text() if out.is_file() else ""
    if args.check:
        if old != text:
            sys.stdout.writelines(difflib.unified_diff(old.splitlines(True), text.splitlines(True),
                                                       f"{out} (on disk)", f"{out} (generated)"))
            print(f"mmfuse config-docs --check: {out} is stale; run `mmfuse config-docs`", file=sys.stderr)
            return 1
        return 1 if issues else 0
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(f"wrote {out}")
    return 1 if issues else 0
