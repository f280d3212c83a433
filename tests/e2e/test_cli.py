"""`mmfuse serve` in the foreground (clean exit on SIGTERM) and `mmfuse demo` end to end."""
from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest

from mmfuse.server import free_port, is_ready

pytestmark = [pytest.mark.e2e, pytest.mark.slow]  # starts a tritonserver of its own


def test_serve_runs_in_the_foreground_and_exits_cleanly_on_sigterm(tmp_path):
    grpc, http, metrics = free_port(), free_port(), free_port()
    log = open(tmp_path / "serve.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mmfuse.cli", "serve", "--grpc-port", str(grpc), "--http-port", str(http),
         "--metrics-port", str(metrics)],
        stdout=log, stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 180
        while not is_ready(http):
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "mmfuse serve not ready in 180 s"
            time.sleep(0.3)
        from mmfuse.clients import MMFuseClient

        with MMFuseClient(f"127.0.0.1:{grpc}") as client:
            assert client.embed_text(["hello"]).valid.all()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        assert not is_ready(http)
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()


def test_demo_prints_fused_results_from_a_real_server():
    out = subprocess.run([sys.executable, "-m", "mmfuse.cli", "demo"], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "Server ready" in out.stdout
    assert "garbage bytes" in out.stdout and "undecodable,ok" in out.stdout
    assert "truncated PNG" in out.stdout
    assert "(no image)" in out.stdout and "missing,ok" in out.stdout
    assert "Server stopped (exit code 0)" in out.stdout
