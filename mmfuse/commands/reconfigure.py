"""mmfuse reconfigure [MODEL ...] [--model-repository DIR] [--url HOST:PORT] [--dry-run]

Apply edited config.pbtxt files to a running tritonserver without a restart: show the diff,
validate offline, load with a config override, verify with probe requests, roll back on failure.
Exit codes: 0 applied (or nothing to do), 2 invalid configuration (nothing sent), 1 failed and
rolled back (or the server could not be reached).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..paths import DEFAULT_MODEL_REPOSITORY


def register(sub) -> None:
    p = sub.add_parser(
        "reconfigure",
        help="apply edited model configs to a running server (explicit model control): diff, validate, "
             "apply, probe, roll back on failure",
    )
    p.add_argument("models", nargs="*", metavar="MODEL",
                   help="models to apply (default: every loaded model whose config.pbtxt differs from the served one; "
                        "name a model that is not loaded to load it)")
    p.add_argument("--model-repository", default=str(DEFAULT_MODEL_REPOSITORY),
                   help="folder with the edited config.pbtxt files (and each model's version folders)")
    p.add_argument("--url", default="127.0.0.1:8001", help="gRPC HOST:PORT of the server")
    p.add_argument("--dry-run", action="store_true", help="show the diff and validate; send nothing")
    p.add_argument("--no-probe", action="store_true", help="verify readiness only, send no probe request")
    p.add_argument("--load-weights", action="store_true",
                   help="validate encoders by building them with their weights (default: parameters only)")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds allowed for each model load")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    from ..reconfigure import ReconfigureError, ValidationFailed, apply, cached_responses, plan, validate

    repository = Path(args.model_repository)
    if not repository.is_dir():
        print(f"mmfuse reconfigure: model repository {repository} is not a directory", file=sys.stderr)
        return 2
    client = grpcclient.InferenceServerClient(args.url)
    try:
        try:
            the_plan = plan(client, repository, args.models)
        except ValidationFailed as error:
            print(f"mmfuse reconfigure: {error}", file=sys.stderr)
            return 2
        except InferenceServerException as error:
            print(f"mmfuse reconfigure: cannot read the server's models at {args.url}: {error.message()}",
                  file=sys.stderr)
            return 1
        except ReconfigureError as error:
            print(f"mmfuse reconfigure: {error}", file=sys.stderr)
            return 2
        for name in the_plan.not_loaded:
            print(f"note: '{name}' is not loaded on the server; name it to load it")
        if not the_plan.changes:
            print(f"no change: the server serves the configs in {repository}"
                  + (f" ({', '.join(the_plan.unchanged)})" if the_plan.unchanged else ""))
            return 0
        for change in the_plan.changes:
            print(change.diff() or f"{change.name}: load (not loaded yet)")
        errors = validate(the_plan.changes, the_plan.served, repository, load_weights=args.load_weights)
        if errors:
            print("mmfuse reconfigure: invalid configuration, nothing was sent to the server:", file=sys.stderr)
            for line in errors:
                print(f"  {line}", file=sys.stderr)
            return 2
        print(f"valid: {', '.join(c.name for c in the_plan.changes)}")
        stale = cached_responses(client, the_plan.changes)
        if stale:
            print("mmfuse reconfigure: a live change would serve stale cached responses, nothing was sent to the server:",
                  file=sys.stderr)
            for line in stale:
                print(f"  {line}", file=sys.stderr)
            return 2
        if args.dry_run:
            print("dry run: nothing sent")
            return 0
        try:
            outcome = apply(client, the_plan, probe=not args.no_probe, timeout_s=args.timeout)
        except ReconfigureError as error:
            print(f"mmfuse reconfigure: {error}", file=sys.stderr)
            return 1
        print(f"applied: {', '.join(outcome.applied)}")
        return 0
    finally:
        client.close()
