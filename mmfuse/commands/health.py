"""mmfuse health [--url HOST:PORT] [--json]: is the server live and ready, is every ensemble ready?"""
from __future__ import annotations

import argparse
import json
import sys

from ._client_args import add_connection_args, options_or_report


def register(sub) -> None:
    p = sub.add_parser("health", help="server liveness/readiness and each generated ensemble's readiness "
                                      "(exit 0 only if all are ready)")
    p.add_argument("--json", action="store_true", help="print JSON")
    add_connection_args(p)
    p.set_defaults(func=run)


def check(options) -> dict:
    from tritonclient.utils import InferenceServerException

    from mmfuse.clients._runtime import connect
    from mmfuse.clients.ensembles import SPECS

    report = {"url": options.url, "live": False, "ready": False, "ensembles": {}, "error": None}
    connection = connect(options)
    try:
        t = options.timeout_s
        report["live"] = bool(connection.is_server_live(client_timeout=t))
        report["ready"] = bool(connection.is_server_ready(client_timeout=t))
        for name in SPECS:
            report["ensembles"][name] = bool(connection.is_model_ready(name, client_timeout=t))
    except InferenceServerException as error:
        report["error"] = f"{error.status() or 'error'}: {error.message()}"
    finally:
        connection.close()
    report["healthy"] = bool(report["live"] and report["ready"] and report["ensembles"]
                             and all(report["ensembles"].values()))
    return report


def run(args: argparse.Namespace) -> int:
    options = options_or_report(args, "health")
    if options is None:
        return 2
    report = check(options)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        yes = lambda b: "yes" if b else "NO"  # noqa: E731
        print(f"server {report['url']}: live {yes(report['live'])}, ready {yes(report['ready'])}")
        width = max((len(n) for n in report["ensembles"]), default=0)
        for name, ready in report["ensembles"].items():
            print(f"  {name:<{width}}  {'ready' if ready else 'NOT READY'}")
        if report["error"]:
            print(f"error: {report['error']}", file=sys.stderr)
    return 0 if report["healthy"] else 1
