"""The same load with Triton's perf_analyzer, by hand: its input files and command lines for the report.

``mmfuse eval`` itself runs perf_analyzer through mmfuse.perf_analyzer (which finds the binary, links its two
libraries under the user's cache and writes the same input data: ``input_data``, re-exported here); the lines
below let a reader rerun the measurement from a shell.

perf_analyzer ships in the tritonclient 2.51 wheel (``.venv/bin/perf_analyzer``); it needs
``libb64.so.0d`` and ``libcudart.so.12``, which the nvidia-pytriton wheel carries under hashed names
in ``nvidia_pytriton.libs/``: ``SETUP`` links them under their plain names in a folder put on
LD_LIBRARY_PATH. The input file of each ensemble holds the very requests ``mmfuse eval`` cycles
through (one row each), so both tools send the same data. A BYTES tensor's ``b64`` is its serialised
form, as perf_analyzer reads it: each element a 4-byte little-endian length and the bytes.
"""
from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..perf_analyzer import input_data

__all__ = ["SETUP", "commands", "fill_commands", "input_data", "write_inputs"]

SETUP = """\
SP=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
mkdir -p /tmp/pa-libs
ln -sf "$SP"/nvidia_pytriton.libs/libb64-*.so.0d /tmp/pa-libs/libb64.so.0d
ln -sf "$SP"/nvidia_pytriton.libs/libcudart-*.so.12* /tmp/pa-libs/libcudart.so.12
export LD_LIBRARY_PATH=/tmp/pa-libs"""


def commands(ensemble: str, data_file: str, concurrencies: Sequence[int], rates: Sequence[float],
             requests: int) -> list[str]:
    """perf_analyzer lines; ``$URL`` is the server, ``$REPORT`` the report folder (both set by ``SETUP``)."""
    common = (f".venv/bin/perf_analyzer -m {ensemble} -i grpc -u $URL --input-data $REPORT/{data_file} -b 1 "
              f"--measurement-mode count_windows --measurement-request-count {requests} --percentile 99 "
              "--stability-percentage 50")
    closed = " ".join(str(c) for c in concurrencies)
    out = [f"for c in {closed}; do {common} --concurrency-range $c; done"]
    if rates:
        out.append(f"for r in {' '.join(f'{r:g}' for r in rates)}; do {common} --request-rate-range $r; done")
    return out


def write_inputs(folder: Path, pools: Mapping[str, list], url: str) -> dict[str, Any]:
    folder.mkdir(parents=True, exist_ok=True)
    setup = f"URL={url}  # the server measured\nREPORT={folder.parent}  # this report's folder\n{SETUP}"
    out: dict[str, Any] = {"setup": setup, "commands": {}}
    for ensemble, pool in pools.items():
        path = folder / f"{ensemble}.json"
        path.write_text(json.dumps(input_data(pool)) + "\n")
        relative = f"{folder.name}/{path.name}"
        out["commands"][ensemble] = {"input_data": relative, "lines": []}
    return out


def fill_commands(load: dict[str, Any]) -> None:
    """Command lines with the concurrencies and the rates the report used, per ensemble."""
    for ensemble, entry in load["perf_analyzer"]["commands"].items():
        runs = [r for r in load["runs"] if r["ensemble"] == ensemble]
        conc = [int(r["concurrency"]) for r in runs if r["mode"] == "closed"]
        rates = [float(r["rate_per_s"]) for r in runs if r["mode"] == "open"]
        entry["lines"] = commands(ensemble, entry["input_data"], conc, rates, min(load["bounds"]["requests"], 100))
