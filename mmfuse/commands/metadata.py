"""mmfuse metadata [ENSEMBLE...] [--config]: server and ensemble metadata as JSON.

An ensemble whose fusion step serves a classify head (outputs PROBS and LABEL) also gets ``classes``: the
class names in PROBS order (the fusion model's ``classes`` parameter, written by ``mmfuse train``).
"""
from __future__ import annotations

import argparse
import json
import sys

from ._client_args import add_connection_args, options_or_report


def register(sub) -> None:
    p = sub.add_parser("metadata", help="server metadata and each ensemble's tensors (and config) as JSON")
    p.add_argument("ensembles", nargs="*", metavar="ENSEMBLE", help="default: every generated ensemble")
    p.add_argument("--config", action="store_true", help="include each model's config as the server has it")
    add_connection_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from tritonclient.utils import InferenceServerException

    from mmfuse.clients._runtime import connect
    from mmfuse.clients.ensembles import SPECS

    options = options_or_report(args, "metadata")
    if options is None:
        return 2
    names = args.ensembles or list(SPECS)
    connection = connect(options)
    try:
        out = {"server": connection.get_server_metadata(as_json=True, client_timeout=options.timeout_s),
               "models": {}}
        for name in names:
            entry = {"metadata": connection.get_model_metadata(name, as_json=True, client_timeout=options.timeout_s)}
            config = connection.get_model_config(name, as_json=True, client_timeout=options.timeout_s)["config"]
            classes = _classes(connection, config, options.timeout_s)
            if classes is not None:
                entry["classes"] = classes
            if args.config:
                entry["config"] = config
            out["models"][name] = entry
    except InferenceServerException as error:
        print(f"mmfuse metadata: {options.url}: {error.status() or 'error'}: {error.message()}", file=sys.stderr)
        return 1
    finally:
        connection.close()
    print(json.dumps(out, indent=2))
    return 0


def _classes(connection, config: dict, timeout_s: float) -> list[str] | None:
    """The class names of the classify head behind an ensemble's LABEL output, None where there is none."""
    if "LABEL" not in {o.get("name") for o in config.get("output", [])}:
        return None
    for step in config.get("ensemble_scheduling", {}).get("step", []):
        if "LABEL" in step.get("output_map", {}):
            model = connection.get_model_config(step["model_name"], as_json=True, client_timeout=timeout_s)["config"]
            value = model.get("parameters", {}).get("classes", {}).get("string_value", "")
            return json.loads(value) if value else []
    return None
