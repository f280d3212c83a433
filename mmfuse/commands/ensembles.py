"""mmfuse ensembles [--json]: the ensembles a server serves, and whether this checkout's client matches each."""
from __future__ import annotations

import argparse
import json
import sys

from ._client_args import add_connection_args, client_options


def register(sub) -> None:
    p = sub.add_parser("ensembles", help="list the ensembles a running server serves, their tensors, and whether "
                                         "the generated client in clients/ matches each")
    p.add_argument("--json", action="store_true", help="print JSON")
    add_connection_args(p)
    p.set_defaults(func=run)


def _spec_signature(spec) -> tuple[list, list]:
    def sig(tensors):
        return sorted((t.name, t.datatype, (["-1"] if spec.batched else []) + [str(d) for d in t.dims])
                      for t in tensors)
    return sig(spec.inputs), sig(spec.outputs)


def list_ensembles(options) -> list[dict]:
    from mmfuse.clients._runtime import connect
    from mmfuse.clients.ensembles import MODULES, SPECS

    connection = connect(options)
    t = options.timeout_s
    try:
        out = []
        for model in connection.get_model_repository_index(as_json=True, client_timeout=t).get("models", []):
            name = model["name"]
            if model.get("state") != "READY":
                continue  # an unloaded model's platform cannot be asked
            config = connection.get_model_config(name, as_json=True, client_timeout=t)["config"]
            if config.get("platform") != "ensemble":
                continue
            meta = connection.get_model_metadata(name, as_json=True, client_timeout=t)
            inputs = [(i["name"], i["datatype"], [str(d) for d in i["shape"]]) for i in meta.get("inputs", [])]
            outputs = [(o["name"], o["datatype"], [str(d) for d in o["shape"]]) for o in meta.get("outputs", [])]
            if name not in SPECS:
                client = "none: run `mmfuse gen-clients`"
            elif _spec_signature(SPECS[name]) == (sorted(inputs), sorted(outputs)):
                client = f"clients/{MODULES[name].__name__.split('.')[-1]}.py"
            else:
                client = "STALE: the server's tensors differ from the generated client"
            out.append({"name": name, "version": model.get("version", ""), "state": model["state"],
                        "inputs": inputs, "outputs": outputs, "client": client})
        return out
    finally:
        connection.close()


def run(args: argparse.Namespace) -> int:
    from tritonclient.utils import InferenceServerException

    try:
        options = client_options(args)
        rows = list_ensembles(options)
    except ValueError as error:
        print(f"mmfuse ensembles: {error}", file=sys.stderr)
        return 2
    except InferenceServerException as error:
        print(f"mmfuse ensembles: {options.url}: {error.status() or 'error'}: {error.message()}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    fmt = lambda ts: ", ".join(f"{n} {d}[{','.join(s)}]" for n, d, s in ts)  # noqa: E731
    for row in rows:
        print(f"{row['name']}  (version {row['version']}, {row['state']})")
        print(f"    in:     {fmt(row['inputs'])}")
        print(f"    out:    {fmt(row['outputs'])}")
        print(f"    client: {row['client']}")
    return 0
