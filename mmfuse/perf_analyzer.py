"""Triton's perf_analyzer as the load generator of ``mmfuse bench`` and ``mmfuse eval`` (a C++ client: it
leaves the cores to the server where mmfuse.loadgen's asyncio client competed with it).

Where it comes from: the ``tritonclient==2.51.0`` wheel ships ``bin/perf_analyzer`` (``find_perf_analyzer``:
``MMFUSE_PERF_ANALYZER`` if set, else next to this interpreter, else on PATH). It links ``libb64.so.0d`` and
``libcudart.so.12``, which the nvidia-pytriton wheel (mmfuse's server extra) carries under hashed names in
``site-packages/nvidia_pytriton.libs/``; ``library_dir`` links them under their plain names in a folder of the
user's cache, and ``run`` puts that folder first on perf_analyzer's LD_LIBRARY_PATH.

What is sent: ``input_data`` writes a pool of requests as perf_analyzer's ``--input-data`` JSON, one entry per
*row* (a BYTES element as the ``b64`` of its serialised form: a 4-byte little-endian length and the bytes).
With ``-b ROWS`` perf_analyzer builds each request from ROWS consecutive entries, wrapping around the file
(checked against a real tritonserver with tensor tracing: ``-b 2`` over entries 0..4 sent [0,1], [2,3],
[4,0], [1,2], ...). A pool of requests of ROWS rows each is thus sent request by request, as written, and
its shape in the file is one row's (``[1]`` for TEXT/IMAGE: an entry of shape ``[ROWS, 1]`` is refused).

How a run is measured (``run``), three ways, each bounded:

* windows (``window_ms``: time_windows, or ``window_requests``: count_windows): perf_analyzer measures
  windows until the last three are "stable" and reports the three merged. mmfuse makes every window count
  as stable (``--stability-percentage`` 100000) and allows 3 (``--max-trials``), so a run is exactly three
  windows: with a loose 50-100 % a busy 2-core machine often fails the check, and perf_analyzer then exits
  with status 2 and no report at all. A time window must see a request complete, else status 3 ("No
  valid requests recorded within time interval"). A count window ends at the first whole second (it
  polls once a second) after it has its requests. Throughput is perf_analyzer's: requests completed in the
  windows / their length.
* ``request_count``: exactly that many requests (``--request-count``), no warm-up, no windows; perf_analyzer
  still rounds its one window up to whole seconds, so the throughput comes from its profile export
  (``--profile-export-file``: each request's send and response timestamps): from the first send to the
  last response. The export also gives every request's latency and the most requests in flight at once.

perf_analyzer's throughput counts inferences: a request of ``-b ROWS`` is ROWS of them, so its
``Inferences/Second`` is items (rows) per second, and requests per second is that over ROWS. A request
that fails ends the whole run (exit status 99, "Thread [0] had error: ..."): a run that returns has no
failed request. Its latency is from the send to the response, also at a fixed rate (the loadgen's is from
the due time); a fixed rate that it could not keep shows as ``delayed_fraction`` (perf_analyzer's warning,
"N% of the requests were delayed").

Measured against: tritonclient 2.51.0's perf_analyzer, Triton 2.51 (nvidia-pytriton 0.7.0), CPU only.
"""
from __future__ import annotations

import base64
import csv
import glob
import hashlib
import importlib.util
import io
import json
import math
import os
import re
import shlex
import shutil
import site
import struct
import sys
import sysconfig
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

PIP_HINT = "pip install 'tritonclient[all]==2.51.0'"
#: plain name -> the glob of the hashed file in nvidia_pytriton.libs
LIBRARIES = {"libb64.so.0d": "libb64-*.so.0d*", "libcudart.so.12": "libcudart-*.so.12*"}
#: --stability-percentage that every window passes: a run is exactly ``max_trials`` (3) windows
NO_STABILITY = 100_000
#: CSV column -> result key (microseconds in the CSV, milliseconds in the result)
CSV_US = {
    "Client Send": "client_send_ms", "Network+Server Send/Recv": "network_server_ms",
    "Server Queue": "server_queue_ms", "Server Compute Input": "server_compute_input_ms",
    "Server Compute Infer": "server_compute_infer_ms", "Server Compute Output": "server_compute_output_ms",
    "Client Recv": "client_recv_ms", "p50 latency": "p50_ms", "p90 latency": "p90_ms", "p95 latency": "p95_ms",
    "p99 latency": "p99_ms", "Avg latency": "avg_ms", "request/response": "request_response_ms",
    "response wait": "response_wait_ms",
}


class PerfAnalyzerError(RuntimeError):
    """perf_analyzer is missing, cannot run, or a run failed (the message carries perf_analyzer's own)."""

    def __init__(self, message: str, command: Sequence[str] = (), returncode: int | None = None,
                 output: str = ""):
        super().__init__(message)
        self.command, self.returncode, self.output = list(command), returncode, output


# -- where it is -------------------------------------------------------------------------------------------------
def find_perf_analyzer() -> Path:
    """The perf_analyzer binary: ``MMFUSE_PERF_ANALYZER`` if set, else next to this interpreter (a virtual
    environment's bin/, where the tritonclient wheel puts it), else on PATH."""
    env = os.environ.get("MMFUSE_PERF_ANALYZER")
    if env:
        if not Path(env).is_file():
            raise PerfAnalyzerError(f"MMFUSE_PERF_ANALYZER={env} is not a file")
        return Path(env)
    beside = Path(sys.executable).parent / "perf_analyzer"
    if beside.is_file() and os.access(beside, os.X_OK):
        return beside
    found = shutil.which("perf_analyzer")
    if found:
        return Path(found)
    raise PerfAnalyzerError(
        f"perf_analyzer not found (not in {beside.parent}, not on PATH): it ships in the tritonclient wheel; "
        f"install it with `{PIP_HINT}` (mmfuse's setup does), or set MMFUSE_PERF_ANALYZER to the binary")


def _site_dirs() -> list[Path]:
    out: list[Path] = []
    spec = importlib.util.find_spec("pytriton")  # the nvidia-pytriton wheel's package, not imported
    if spec is not None and spec.submodule_search_locations:
        out.append(Path(list(spec.submodule_search_locations)[0]).parent)
    paths = sysconfig.get_paths()
    out += [Path(paths["purelib"]), Path(paths["platlib"])]
    try:
        out += [Path(p) for p in site.getsitepackages()]
    except AttributeError:  # some embedded interpreters
        pass
    return list(dict.fromkeys(out))


def wheel_libraries() -> dict[str, Path]:
    """Plain name -> the hashed file in nvidia_pytriton.libs that perf_analyzer needs under that name."""
    tried = []
    for folder in (d / "nvidia_pytriton.libs" for d in _site_dirs()):
        tried.append(str(folder))
        found = {name: sorted(glob.glob(str(folder / pattern))) for name, pattern in LIBRARIES.items()}
        if all(found.values()):
            return {name: Path(files[-1]) for name, files in found.items()}
    raise PerfAnalyzerError(
        "perf_analyzer needs libb64.so.0d and libcudart.so.12, which mmfuse takes from the nvidia-pytriton wheel "
        f"(nvidia_pytriton.libs/); not found in {', '.join(tried) or 'any site-packages'}: install mmfuse's "
        "server extra (`pip install 'mmfuse[server]'`, nvidia-pytriton==0.7.0)")


def cache_root() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mmfuse" / "perf-analyzer-libs"


def library_dir(root: Path | None = None) -> Path:
    """A folder holding ``libb64.so.0d`` and ``libcudart.so.12``: symlinks to the nvidia-pytriton wheel's files.

    Under ``$XDG_CACHE_HOME/mmfuse/perf-analyzer-libs`` (else ``~/.cache/...``), one subfolder per wheel folder
    (two environments do not relink each other's); made on demand, left alone when already right, and safe
    when two processes make it at once (each link is written under a unique name, then renamed over)."""
    libraries = wheel_libraries()
    source = next(iter(libraries.values())).parent
    folder = (root or cache_root()) / hashlib.sha1(str(source).encode()).hexdigest()[:12]
    folder.mkdir(parents=True, exist_ok=True)
    for name, target in libraries.items():
        link = folder / name
        try:
            if os.readlink(link) == str(target):
                continue
        except OSError:  # missing, or not a link
            pass
        temp = folder / f".{name}.{os.getpid()}.{time.monotonic_ns()}"
        os.symlink(target, temp)
        os.replace(temp, link)  # atomic: a reader sees the old link or the new one
    return folder


def environment(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """``base`` (default: this process's) with ``library_dir()`` first on LD_LIBRARY_PATH."""
    env = dict(os.environ if base is None else base)
    env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (str(library_dir()), env.get("LD_LIBRARY_PATH", "")) if p)
    return env


# -- what it sends -----------------------------------------------------------------------------------------------
def _entry_tensor(row: np.ndarray) -> dict[str, Any]:
    if row.dtype == object:  # b64 is the serialised tensor: each element length-prefixed (uint32 LE)
        raw = b"".join(struct.pack("<I", len(bytes(x))) + bytes(x) for x in row.reshape(-1))
        return {"b64": base64.b64encode(raw).decode(), "shape": list(row.shape)}
    values = row.reshape(-1).tolist()
    if row.dtype.kind == "f":  # float32 carries ~7 digits; more only makes the file longer
        values = [float(f"{v:.7g}") for v in values]
    return {"content": values, "shape": list(row.shape)}


def rows_per_request(pool: Sequence[Mapping[str, np.ndarray]]) -> int:
    """The rows of every request of ``pool`` (all must have the same), i.e. perf_analyzer's ``-b``."""
    rows = {int(array.shape[0]) for request in pool for array in request.values()}
    if len(rows) != 1:
        raise ValueError(f"perf_analyzer sends requests of one size (-b): the pool has requests of {sorted(rows)} rows")
    return rows.pop()


def input_data(pool: Sequence[Mapping[str, np.ndarray]]) -> dict[str, Any]:
    """perf_analyzer's --input-data JSON for ``pool``: one entry per row, in order (each request's rows one after
    another), each tensor without its batch dimension. Sent with ``-b rows_per_request(pool)``, request ``i`` is
    the pool's request ``i`` (modulo its length)."""
    entries = []
    for request in pool:
        for i in range(rows_per_request([request])):
            entries.append({name: _entry_tensor(array[i]) for name, array in request.items()})
    return {"data": entries}


def write_input_data(pool: Sequence[Mapping[str, np.ndarray]], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(input_data(pool)) + "\n")
    return path


# -- the command line ------------------------------------------------------------------------------------------
def command(url: str, model: str, data_file: str | Path, *, concurrency: int | None = None,
            request_rate: float | None = None, batch: int = 1, window_ms: int | None = None,
            window_requests: int | None = None, request_count: int | None = None, max_trials: int = 3,
            stability_percentage: float = NO_STABILITY, warmup_requests: int = 0, async_mode: bool | None = None,
            csv_file: str | Path = "perf.csv", export_file: str | Path | None = None,
            binary: str | Path = "perf_analyzer") -> list[str]:
    """perf_analyzer's argument list for one run: a closed loop (``concurrency``) or a fixed rate
    (``request_rate`` requests per second, constant intervals), measured by time windows (``window_ms``),
    count windows (``window_requests``, the default with 50) or a request count (``request_count``)."""
    if (concurrency is None) == (request_rate is None):
        raise ValueError("give exactly one of concurrency (closed loop) and request_rate (fixed rate)")
    if concurrency is not None and concurrency < 1:
        raise ValueError(f"concurrency must be >= 1, got {concurrency}")
    if request_rate is not None and not request_rate > 0:
        raise ValueError(f"request_rate must be > 0, got {request_rate}")
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    chosen = [k for k, v in (("window_ms", window_ms), ("window_requests", window_requests),
                             ("request_count", request_count)) if v is not None]
    if len(chosen) > 1:
        raise ValueError(f"give one of window_ms, window_requests and request_count, not {' and '.join(chosen)}")
    if not chosen:
        window_requests = 50
    args = [str(binary), "-m", model, "-i", "grpc", "-u", url, "--input-data", str(data_file), "-b", str(batch)]
    if concurrency is not None:
        args += ["--concurrency-range", str(int(concurrency))]
    else:
        args += ["--request-rate-range", f"{request_rate:g}", "--request-distribution", "constant"]
    if async_mode is None:
        async_mode = request_rate is not None  # an open loop must not wait for responses before sending
    args.append("--async" if async_mode else "--sync")
    if request_count is not None:
        if request_count < 1:
            raise ValueError(f"request_count must be >= 1, got {request_count}")
        if concurrency is not None and request_count < concurrency:
            raise ValueError(f"perf_analyzer refuses a request count ({request_count}) below the concurrency "
                             f"({concurrency})")
        if request_rate is not None and request_count < request_rate:
            raise ValueError(f"perf_analyzer refuses a request count ({request_count}) below the request rate "
                             f"({request_rate:g}/s): at least one second of requests")
        if request_rate is not None and warmup_requests:
            # Seen with 2.51: --request-rate-range with --request-count and --warmup-request-count never ends.
            raise ValueError("perf_analyzer 2.51 hangs with a warm-up, a request count and a request rate together")
        args += ["--request-count", str(int(request_count))]
    else:
        if max_trials < 3:
            raise ValueError(f"max_trials must be >= 3 (perf_analyzer reports three windows), got {max_trials}")
        if window_ms is not None:
            if window_ms < 1:
                raise ValueError(f"window_ms must be >= 1, got {window_ms}")
            args += ["--measurement-mode", "time_windows", "--measurement-interval", str(int(window_ms))]
        else:
            if window_requests < 1:
                raise ValueError(f"window_requests must be >= 1, got {window_requests}")
            args += ["--measurement-mode", "count_windows", "--measurement-request-count", str(int(window_requests))]
        args += ["--stability-percentage", f"{stability_percentage:g}", "--max-trials", str(int(max_trials))]
    if warmup_requests:
        args += ["--warmup-request-count", str(int(warmup_requests))]
    args += ["-f", str(csv_file), "--verbose-csv"]
    if export_file is not None:
        args += ["--profile-export-file", str(export_file)]
    return args


# -- what it reports -------------------------------------------------------------------------------------------
def _number(text: str | None) -> float | None:
    try:
        return float(text) if text not in (None, "") else None
    except ValueError:
        return None


def parse_csv(text: str) -> dict[str, Any]:
    """perf_analyzer's ``-f`` report (one load level): throughput in inferences (rows) per second, latencies and
    the server-side split in milliseconds."""
    rows = list(csv.DictReader(io.StringIO(text)))
    if not rows:
        raise ValueError("perf_analyzer's CSV report has no row")
    row = rows[-1]
    out: dict[str, Any] = {}
    if "Concurrency" in row:
        out["concurrency"] = int(float(row["Concurrency"]))
    if "Request Rate" in row:
        out["request_rate"] = float(row["Request Rate"])
    out["infer_per_s"] = _number(row.get("Inferences/Second"))
    for column, key in CSV_US.items():
        if column in row:
            value = _number(row[column])
            out[key] = None if value is None else value / 1e3
    return out


def parse_output(text: str) -> dict[str, Any]:
    """What only perf_analyzer's printed report has: the client's request count (of the windows reported), the
    rate it sent at and whether it kept the rate."""
    out: dict[str, Any] = {}
    count = re.search(r"Client:\s*\n\s*Request count:\s*(\d+)", text)
    if count:
        out["requests"] = int(count.group(1))
    sent = re.search(r"Avg send request rate:\s*([0-9.eE+-]+)", text)
    if sent:
        out["send_rate_per_s"] = float(sent.group(1))
    delayed = re.search(r"([0-9.]+)% of the requests were delayed", text)
    out["delayed_fraction"] = float(delayed.group(1)) / 100 if delayed else 0.0
    out["kept_up"] = not delayed and "not able to keep up" not in text
    return out


def parse_export(path: Path) -> dict[str, Any]:
    """The profile export (``--profile-export-file``): per request, its latency (send to last response), the
    window from the first send to the last response, and the most requests in flight at once."""
    raw = Path(path).read_bytes()
    try:  # BYTES inputs and outputs are written as they are: not always UTF-8
        experiment = json.loads(raw.decode("utf-8", "surrogateescape"), strict=False)["experiments"][-1]
        spans = sorted((int(r["timestamp"]), int(r["response_timestamps"][-1])) for r in experiment["requests"]
                       if r.get("response_timestamps"))
    except ValueError:  # not JSON after all: the timestamps of each request, in the order written
        spans = sorted((int(start), int(ends.split(b",")[-1])) for start, ends in re.findall(
            rb'"timestamp":\s*(\d+),\s*"request_inputs":.*?"response_timestamps":\s*\[([\d,\s]+)\]', raw, re.S))
    if not spans:
        return {"requests": 0, "latencies_ms": [], "seconds": 0.0, "max_in_flight": 0}
    events = sorted([(start, 1) for start, _ in spans] + [(end, -1) for _, end in spans])  # an end before a start
    in_flight = peak = 0
    for _, step in events:
        in_flight += step
        peak = max(peak, in_flight)
    return {"requests": len(spans), "latencies_ms": [(end - start) / 1e6 for start, end in spans],
            "seconds": (max(end for _, end in spans) - spans[0][0]) / 1e9, "max_in_flight": peak}


def _failure(output: str) -> str:
    """perf_analyzer's own message: its lines before a usage text, the errors first."""
    lines = [line.rstrip() for line in output.split("Usage:", 1)[0].splitlines() if line.strip()]
    errors = [line for line in lines if re.search(r"error|fail|unable|cannot|can not|refuse", line, re.I)]
    return "\n".join((errors or lines)[-8:]) or "(no output)"


# -- a run ------------------------------------------------------------------------------------------------------
def run(url: str, model: str, data: str | Path | Sequence[Mapping[str, np.ndarray]], *,
        concurrency: int | None = None, request_rate: float | None = None, batch: int | None = None,
        window_ms: int | None = None, window_requests: int | None = None, request_count: int | None = None,
        max_trials: int = 3, stability_percentage: float = NO_STABILITY, warmup_requests: int = 0,
        async_mode: bool | None = None, export: bool | None = None, timeout_s: float = 600.0,
        server_pid: int | None = None, sample_memory: bool = False) -> dict[str, Any]:
    """One perf_analyzer run against the gRPC endpoint ``url`` (see ``command`` for the load and the measurement).

    ``data``: a pool of requests (arrays with their batch dimension; written with ``input_data``, ``batch`` then
    defaults to their rows) or an --input-data JSON file (``batch`` defaults to 1). ``export`` (default: with a
    request count) adds the profile export and what it gives. With ``server_pid``: the CPU time of the server's
    process tree over perf_analyzer's run (warm-up included) and, with ``sample_memory``, its memory.

    Returns: ``requests`` (measured), ``errors`` (0: a failed request fails the run), ``seconds`` (the measured
    window), ``requests_per_s``, ``items_per_s`` (rows), ``p50_ms`` ``p90_ms`` ``p95_ms`` ``p99_ms``
    ``avg_ms`` (client side), the server-side split of the CSV (``server_queue_ms``, ...), ``command``,
    ``wall_s`` and ``cpu_s`` (perf_analyzer's own CPU time); raises ``PerfAnalyzerError`` with perf_analyzer's
    message when it fails or outlives ``timeout_s``."""
    from . import loadgen  # the server-side sampler (CPU time, memory) that mmfuse.loadgen runs too

    binary = find_perf_analyzer()
    env = environment()
    export = request_count is not None if export is None else export
    with tempfile.TemporaryDirectory(prefix="mmfuse-perf-analyzer-") as tmp:
        tmp = Path(tmp)
        if isinstance(data, (str, Path)):
            data_file, batch = Path(data).resolve(), batch or 1
        else:
            rows = rows_per_request(data)
            if batch not in (None, rows):
                raise ValueError(f"batch {batch} differs from the pool's {rows} rows per request")
            data_file, batch = write_input_data(data, tmp / "input_data.json"), rows
        args = command(url, model, data_file, concurrency=concurrency, request_rate=request_rate, batch=batch,
                       window_ms=window_ms, window_requests=window_requests, request_count=request_count,
                       max_trials=max_trials, stability_percentage=stability_percentage,
                       warmup_requests=warmup_requests, async_mode=async_mode, csv_file=tmp / "report.csv",
                       export_file=tmp / "export.json" if export else None, binary=binary)
        sampled = loadgen.LoadResult()
        server = loadgen._Server(server_pid, sample_memory)
        with open(tmp / "stdout", "wb") as out, open(tmp / "stderr", "wb") as err:
            server.start(sampled)
            started = time.perf_counter()
            returncode, cpu_s = _wait(args, env, tmp, out, err, timeout_s)
            wall_s = time.perf_counter() - started
            server.stop(sampled)
        output = (tmp / "stdout").read_text(errors="replace") + (tmp / "stderr").read_text(errors="replace")
        line = shlex.join(args)
        if returncode is None:
            raise PerfAnalyzerError(f"perf_analyzer did not finish within {timeout_s:g} s (killed): {line}\n"
                                    f"{_failure(output)}", args, None, output)
        if returncode != 0 or not (tmp / "report.csv").is_file():
            raise PerfAnalyzerError(f"perf_analyzer failed (exit status {returncode}): {_failure(output)}\n"
                                    f"command: {line}", args, returncode, output)
        figures = parse_csv((tmp / "report.csv").read_text())
        printed = parse_output(output)
        exported = parse_export(tmp / "export.json") if export else None
    result: dict[str, Any] = {
        "load_generator": "perf_analyzer", "model": model, "mode": "closed" if concurrency is not None else "rate",
        "batch": batch, "command": args, "command_line": line, **printed, **figures, "errors": 0,
        "wall_s": wall_s, "cpu_s": cpu_s,
    }
    if concurrency is not None:
        result["concurrency"] = concurrency
    else:
        result["request_rate"] = request_rate
    if exported is not None:
        result.update(requests=exported["requests"], seconds=exported["seconds"],
                      latencies_ms=exported["latencies_ms"], max_in_flight=exported["max_in_flight"])
    else:
        rate = figures.get("infer_per_s")
        result["seconds"] = result.get("requests", 0) * batch / rate if rate else math.nan
    seconds = result["seconds"]
    result["requests_per_s"] = result.get("requests", 0) / seconds if seconds else math.nan
    result["items_per_s"] = result["requests_per_s"] * batch
    if server_pid is not None:
        result["server_cpu_s"] = sampled.server_cpu_s
        result["server_cpu_cores"] = sampled.server_cpu_s / wall_s if sampled.server_cpu_s is not None else None
        if sample_memory:
            result.update(rss_idle=sampled.rss_idle, rss_peak=sampled.rss_peak, pss_idle=sampled.pss_idle)
    return result


def _wait(args: list[str], env: Mapping[str, str], cwd: Path, out, err, timeout_s: float) -> tuple[int | None, float]:
    """Run ``args`` to its end (or kill it after ``timeout_s``): its exit status (None if killed) and CPU seconds."""
    import subprocess

    proc = subprocess.Popen(args, env=dict(env), cwd=cwd, stdout=out, stderr=err, stdin=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout_s
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here: Popen must not wait again
            return proc.returncode, usage.ru_utime + usage.ru_stime
        if time.monotonic() > deadline:
            proc.kill()
            _, _, usage = os.wait4(proc.pid, 0)
            proc.returncode = -9
            return None, usage.ru_utime + usage.ru_stime
        time.sleep(0.02)
