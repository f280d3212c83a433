"""`mmfuse serve` brings back a Python model whose process died (Triton 2.51 would leave it dead and 'ready')."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from mmfuse import processes
from mmfuse.server import free_port, is_ready
from tests.e2e.conftest import tiny_repository

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def _wait(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value is not None and value is not False:
            return value
        time.sleep(0.3)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def test_serve_reloads_a_model_whose_process_was_killed(tmp_path, checkpoint):
    from mmfuse.clients import MMFuseClient, MMFuseClientError

    repo = tiny_repository(tmp_path / "repo", checkpoint)
    grpc, http, metrics = free_port(), free_port(), free_port()
    log = open(tmp_path / "serve.log", "wb")
    serve = subprocess.Popen(
        [sys.executable, "-m", "mmfuse.cli", "serve", "--model-repository", str(repo), "--model-control-mode",
         "explicit", "--grpc-port", str(grpc), "--http-port", str(http), "--metrics-port", str(metrics)],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait(lambda: is_ready(http), 180, "readiness")
        [triton] = [p for p in processes.children(serve.pid)]
        victim = processes.stubs(triton)["text_encoder_0_0"]
        with MMFuseClient(f"127.0.0.1:{grpc}") as client:
            before = client.embed_text(["a red circle"]).embedding
            os.kill(victim.pid, signal.SIGKILL)
            fresh = _wait(lambda: (s := processes.stubs(triton).get("text_encoder_0_0")) and s.pid != victim.pid and s
                          or None, 90, "a new text_encoder process")
            assert fresh.pid != victim.pid

            def answers():
                try:
                    return client.embed_text(["a red circle"]).embedding
                except MMFuseClientError:
                    return None

            after = _wait(answers, 60, "embed_text to answer again")
        assert (after == before).all()
        assert serve.poll() is None
        assert "died; reloading it" in (tmp_path / "serve.log").read_text()
        serve.send_signal(signal.SIGTERM)
        assert serve.wait(timeout=60) == 0
    finally:
        if serve.poll() is None:
            os.killpg(serve.pid, signal.SIGKILL)
        log.close()
