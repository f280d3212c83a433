"""mmfuse.perf_analyzer without a server: its reports parsed, its libraries linked, its command lines, a run
through a stand-in binary. The CSV and printed texts are perf_analyzer 2.51's own, captured from real runs
against a tiny-repository tritonserver (embed_text, -b 2)."""
from __future__ import annotations

import base64
import json
import os
import stat
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from mmfuse import perf_analyzer as pa
from mmfuse.wire import bytes_column

CLOSED_CSV = """\
Concurrency,Inferences/Second,Client Send,Network+Server Send/Recv,Server Queue,Server Compute Input,Server Compute Infer,Server Compute Output,Client Recv,p50 latency,p90 latency,p95 latency,p99 latency,Avg latency,request/response,response wait
2,672.966,4,3400,5,52,2002,455,2,5899,6212,6325,6876,5923,6,5896
"""
RATE_CSV = """\
Request Rate,Inferences/Second,Client Send,Network+Server Send/Recv,Server Queue,Server Compute Input,Server Compute Infer,Server Compute Output,Client Recv,p50 latency,p90 latency,p95 latency,p99 latency,Avg latency,request/response,response wait
2000,3806.74,4,9156,6,253,7330,4115,0,15895,32742,50492,122309,20868,4,20855
"""
PLAIN_CSV = """\
Concurrency,Inferences/Second,Client Send,Network+Server Send/Recv,Server Queue,Server Compute Input,Server Compute Infer,Server Compute Output,Client Recv,p50 latency,p90 latency,p95 latency,p99 latency
1,352.179,3,3518,7,35,1798,304,2,5567,5771,5967,7999
"""
RATE_OUTPUT = """\
 Successfully read data for 1 stream/streams with 5 step/steps.
*** Measurement Settings ***
  Batch size: 2
  Service Kind: TRITON
  Using "count_windows" mode for stabilization
  Stabilizing using average throughput
  Minimum number of samples in each window: 300
  Using uniform distribution on request generation
  Using asynchronous calls for inference

Request Rate: 2000 inference requests per seconds
  Client: 
    Request count: 5747
    Avg send request rate: 2006.72 infer/sec
    [WARNING] Perf Analyzer was not able to keep up with the desired request rate. 2.56% of the requests were delayed. 
    Throughput: 3806.74 infer/sec
    Avg latency: 20868 usec (standard deviation 17510 usec)
    p50 latency: 15895 usec
  Server: 
    Inference count: 11494
    Execution count: 5747
    Successful request count: 5747
"""  # noqa: W291 - perf_analyzer's trailing spaces, as printed
CLOSED_OUTPUT = """\
Request concurrency: 2
  Client: 
    Request count: 849
    Throughput: 672.966 infer/sec
  Server: 
    Inference count: 1698
    Successful request count: 849
"""  # noqa: W291


def test_closed_loop_csv():
    r = pa.parse_csv(CLOSED_CSV)
    assert r["concurrency"] == 2 and r["infer_per_s"] == 672.966
    assert (r["p50_ms"], r["p90_ms"], r["p95_ms"], r["p99_ms"], r["avg_ms"]) == (5.899, 6.212, 6.325, 6.876, 5.923)
    assert r["server_queue_ms"] == 0.005 and r["server_compute_infer_ms"] == 2.002
    assert r["network_server_ms"] == 3.4 and r["response_wait_ms"] == 5.896


def test_rate_csv_and_the_plain_one():
    r = pa.parse_csv(RATE_CSV)
    assert r["request_rate"] == 2000.0 and "concurrency" not in r and r["p99_ms"] == 122.309
    plain = pa.parse_csv(PLAIN_CSV)  # without --verbose-csv: no average
    assert plain["p50_ms"] == 5.567 and "avg_ms" not in plain
    with pytest.raises(ValueError, match="no row"):
        pa.parse_csv(CLOSED_CSV.splitlines()[0] + "\n")


def test_printed_report():
    r = pa.parse_output(RATE_OUTPUT)
    assert r["requests"] == 5747 and r["send_rate_per_s"] == 2006.72
    assert r["delayed_fraction"] == pytest.approx(0.0256) and r["kept_up"] is False
    c = pa.parse_output(CLOSED_OUTPUT)
    assert c["requests"] == 849 and c["delayed_fraction"] == 0.0 and c["kept_up"] is True


def test_profile_export(tmp_path):
    ms = 1_000_000  # ns
    requests = [{"timestamp": 10 * ms, "request_inputs": {}, "response_timestamps": [30 * ms]},
                {"timestamp": 0, "request_inputs": {}, "response_timestamps": [10 * ms]},
                {"timestamp": 20 * ms, "request_inputs": {}, "response_timestamps": [25 * ms]}]
    path = tmp_path / "export.json"
    path.write_text(json.dumps({"experiments": [{"experiment": {"mode": "concurrency", "value": 2},
                                                 "requests": requests, "window_boundaries": [0, 1]}],
                                "version": "2.51.0", "service_kind": "triton", "endpoint": ""}))
    r = pa.parse_export(path)
    # sorted by send; a response at the very time of a send ends before it: at most 2 in flight
    assert r["requests"] == 3 and r["latencies_ms"] == [10.0, 20.0, 5.0]
    assert r["seconds"] == pytest.approx(0.030) and r["max_in_flight"] == 2
    # A BYTES input is written as it is (control characters escaped, the rest raw), as with a PNG:
    png = b'{"timestamp":5,"request_inputs":{"IMAGE":"\\u0000\x89PNG\\r\\n"},"response_timestamps":[9000005],'
    raw = b'{"experiments":[{"experiment":{"mode":"concurrency","value":1},"requests":[' + png + \
        b'"response_outputs":[{"STATUS":"ok"}]}],"window_boundaries":[0,1]}],"version":"2.51.0"}'
    path.write_bytes(raw)
    assert pa.parse_export(path)["latencies_ms"] == [9.0]
    path.write_bytes(raw.replace(b"\\u0000", b'"'))  # not JSON: the timestamps are still read
    assert pa.parse_export(path)["latencies_ms"] == [9.0]


def test_input_data_sends_each_request_as_consecutive_rows():
    pool = [{"TEXT": bytes_column(["a0", "a1"]), "IMAGE": bytes_column([b"\x00i0", b"i1"])},
            {"TEXT": bytes_column(["b0", "b1"]), "IMAGE": bytes_column([b"j0", b""])}]
    entries = pa.input_data(pool)["data"]
    texts = [base64.b64decode(e["TEXT"]["b64"]) for e in entries]
    assert texts == [b"\x02\x00\x00\x00a0", b"\x02\x00\x00\x00a1", b"\x02\x00\x00\x00b0", b"\x02\x00\x00\x00b1"]
    assert base64.b64decode(entries[3]["IMAGE"]["b64"]) == b"\x00\x00\x00\x00"  # an empty element
    assert all(e["TEXT"]["shape"] == [1] for e in entries) and pa.rows_per_request(pool) == 2
    floats = pa.input_data([{"X": np.array([[0.1, 2.0], [3.0, 4.0]], np.float32)}])["data"]
    assert floats == [{"X": {"content": [0.1, 2.0], "shape": [2]}}, {"X": {"content": [3.0, 4.0], "shape": [2]}}]
    with pytest.raises(ValueError, match=r"\[1, 2\] rows"):
        pa.rows_per_request([{"TEXT": bytes_column(["x"])}, pool[0]])


def test_command_lines():
    closed = pa.command("127.0.0.1:1", "embed_text", "d.json", concurrency=4, batch=3, window_ms=1000,
                        warmup_requests=8, csv_file="r.csv")
    line = " ".join(closed)
    assert closed[:3] == ["perf_analyzer", "-m", "embed_text"] and "-i grpc -u 127.0.0.1:1 --input-data d.json -b 3" in line
    assert "--concurrency-range 4 --sync" in line and "--request-rate-range" not in line
    assert "--measurement-mode time_windows --measurement-interval 1000" in line
    assert f"--stability-percentage {pa.NO_STABILITY} --max-trials 3" in line
    assert "--warmup-request-count 8 -f r.csv --verbose-csv" in line and "--profile-export-file" not in line
    rate = " ".join(pa.command("u", "m", "d", request_rate=2.5, window_requests=40))
    assert "--request-rate-range 2.5 --request-distribution constant --async" in rate
    assert "--measurement-mode count_windows --measurement-request-count 40" in rate and "--concurrency-range" not in rate
    default = " ".join(pa.command("u", "m", "d", concurrency=1))
    assert "--measurement-request-count 50" in default
    counted = " ".join(pa.command("u", "m", "d", concurrency=2, request_count=10, export_file="e.json"))
    assert "--request-count 10" in counted and "--measurement-mode" not in counted and "--max-trials" not in counted
    assert counted.endswith("--profile-export-file e.json")


@pytest.mark.parametrize("kwargs, message", [
    ({}, "exactly one of concurrency"),
    ({"concurrency": 2, "request_rate": 5.0}, "exactly one of concurrency"),
    ({"concurrency": 0}, "concurrency must be >= 1"),
    ({"request_rate": 0.0}, "request_rate must be > 0"),
    ({"concurrency": 1, "batch": 0}, "batch must be >= 1"),
    ({"concurrency": 1, "window_ms": 100, "request_count": 5}, "not window_ms and request_count"),
    ({"concurrency": 4, "request_count": 3}, "below the concurrency"),
    ({"request_rate": 10.0, "request_count": 5}, "below the request rate"),
    ({"request_rate": 1.0, "request_count": 5, "warmup_requests": 2}, "hangs"),
    ({"concurrency": 1, "window_ms": 100, "max_trials": 2}, "max_trials must be >= 3"),
])
def test_command_line_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        pa.command("u", "m", "d", **kwargs)


def _fake_wheel(tmp_path: Path, monkeypatch, names=("libb64-98cb6333.so.0d", "libcudart-09529672.so.12.6.77")) -> Path:
    site = tmp_path / "site-packages"
    libs = site / "nvidia_pytriton.libs"
    libs.mkdir(parents=True, exist_ok=True)
    for name in names:
        (libs / name).write_bytes(b"\x7fELF")
    monkeypatch.setattr(pa, "_site_dirs", lambda: [tmp_path / "elsewhere", site])
    return libs


def test_library_dir_links_the_wheels_files_once(tmp_path, monkeypatch):
    libs = _fake_wheel(tmp_path, monkeypatch)
    root = tmp_path / "cache"
    folder = pa.library_dir(root)
    assert folder.parent == root
    assert os.readlink(folder / "libb64.so.0d") == str(libs / "libb64-98cb6333.so.0d")
    assert os.readlink(folder / "libcudart.so.12") == str(libs / "libcudart-09529672.so.12.6.77")
    made = {p.name: p.lstat().st_mtime_ns for p in folder.iterdir()}
    assert pa.library_dir(root) == folder  # again: the same folder, the links untouched
    assert {p.name: p.lstat().st_mtime_ns for p in folder.iterdir()} == made
    (folder / "libb64.so.0d").unlink()
    (folder / "libb64.so.0d").symlink_to(tmp_path / "stale")
    pa.library_dir(root)  # a wrong link is replaced
    assert os.readlink(folder / "libb64.so.0d") == str(libs / "libb64-98cb6333.so.0d")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert pa.library_dir().parent == tmp_path / "xdg" / "mmfuse" / "perf-analyzer-libs"
    env = pa.environment({"LD_LIBRARY_PATH": "/opt/x"})
    assert env["LD_LIBRARY_PATH"] == f"{pa.library_dir()}{os.pathsep}/opt/x"


def test_library_dir_made_by_many_at_once(tmp_path, monkeypatch):
    _fake_wheel(tmp_path, monkeypatch)
    root, errors, folders = tmp_path / "cache", [], []

    def make():
        try:
            for _ in range(20):
                folders.append(pa.library_dir(root))
        except Exception as error:  # noqa: BLE001 - collected and asserted
            errors.append(error)

    threads = [threading.Thread(target=make) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(set(folders)) == 1
    assert sorted(p.name for p in folders[0].iterdir()) == ["libb64.so.0d", "libcudart.so.12"]  # no temporaries left


def test_missing_libraries_and_binary_say_how_to_install(tmp_path, monkeypatch):
    _fake_wheel(tmp_path, monkeypatch, names=("libb64-98cb6333.so.0d",))
    with pytest.raises(pa.PerfAnalyzerError, match=r"libcudart\.so\.12.*nvidia-pytriton"):
        pa.library_dir(tmp_path / "cache")
    monkeypatch.delenv("MMFUSE_PERF_ANALYZER", raising=False)
    monkeypatch.setattr(sys, "executable", str(tmp_path / "bin" / "python"))
    monkeypatch.setenv("PATH", str(tmp_path / "nothing"))
    with pytest.raises(pa.PerfAnalyzerError, match=r"pip install 'tritonclient\[all\]==2\.51\.0'"):
        pa.find_perf_analyzer()
    (tmp_path / "bin").mkdir()
    beside = tmp_path / "bin" / "perf_analyzer"
    beside.write_text("#!/bin/sh\n")
    beside.chmod(beside.stat().st_mode | stat.S_IXUSR)
    assert pa.find_perf_analyzer() == beside
    monkeypatch.setenv("MMFUSE_PERF_ANALYZER", str(tmp_path / "missing"))
    with pytest.raises(pa.PerfAnalyzerError, match="MMFUSE_PERF_ANALYZER"):
        pa.find_perf_analyzer()


FAKE = """\
#!/usr/bin/env python3
import sys
args = sys.argv[1:]
if "-m" in args and args[args.index("-m") + 1] == "broken":
    print("Error: the model is broken\\nUsage: perf_analyzer [options]\\n  --help text, many lines")
    sys.exit(99)
if "-m" in args and args[args.index("-m") + 1] == "slow":
    import time
    time.sleep(30)
open(args[args.index("-f") + 1], "w").write(CSV)
print(OUTPUT)
"""


def test_run_through_a_stand_in_binary(tmp_path, monkeypatch):
    fake = tmp_path / "perf_analyzer"
    fake.write_text(FAKE.replace("CSV)", f"{CLOSED_CSV!r})").replace("(OUTPUT)", f"({CLOSED_OUTPUT!r})"))
    fake.chmod(0o755)
    monkeypatch.setenv("MMFUSE_PERF_ANALYZER", str(fake))
    monkeypatch.setattr(pa, "library_dir", lambda root=None: tmp_path)
    pool = [{"TEXT": bytes_column(["a", "b"])}, {"TEXT": bytes_column(["c", "d"])}]
    r = pa.run("127.0.0.1:1", "embed_text", pool, concurrency=2, window_ms=500, server_pid=os.getpid())
    assert r["load_generator"] == "perf_analyzer" and r["batch"] == 2 and r["errors"] == 0
    assert "-b 2 --concurrency-range 2" in r["command_line"] and r["command"][0] == str(fake)
    assert r["requests"] == 849 and r["p99_ms"] == 6.876 and r["items_per_s"] == pytest.approx(672.966)
    assert r["requests_per_s"] == pytest.approx(672.966 / 2) and r["seconds"] == pytest.approx(849 * 2 / 672.966)
    assert r["wall_s"] > 0 and r["cpu_s"] >= 0 and r["server_cpu_s"] is not None
    with pytest.raises(ValueError, match="differs"):
        pa.run("u", "embed_text", pool, concurrency=1, batch=3)
    with pytest.raises(pa.PerfAnalyzerError, match="exit status 99") as caught:
        pa.run("u", "broken", pool, concurrency=1)
    assert "the model is broken" in str(caught.value) and "--help text" not in str(caught.value)
    assert caught.value.returncode == 99 and caught.value.command[0] == str(fake)
    with pytest.raises(pa.PerfAnalyzerError, match="did not finish within 0.5 s") as caught:
        pa.run("u", "slow", pool, concurrency=1, timeout_s=0.5)
    assert caught.value.returncode is None
