"""The distribution as a user gets it: a wheel built from this checkout, installed into a new virtual
environment outside the checkout, serves a repository written by `mmfuse init` and answers `mmfuse infer`.

The new environment gets the heavy dependencies (torch, open_clip, tritonclient, the tritonserver wheel)
by a path to this checkout's .venv site-packages (a .pth line: no editable install, no checkout on the path),
and mmfuse itself only from the wheel.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest

from mmfuse.server import free_port, is_ready
from tests.hub import TINY, write_checkpoint
from tests.paths import REPO_ROOT

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

SOURCES = ("pyproject.toml", "README.md", "mmfuse", "python_backends", "clients", "model_repository")


def run(cmd, cwd, env=None, timeout=600) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{cmd}: exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    return result


@pytest.fixture(scope="module")
def wheel_venv(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("wheel")
    source = root / "source"
    source.mkdir()
    for name in SOURCES:  # a copy: building in place would write build/ and egg-info into the checkout
        src = REPO_ROOT / name
        if src.is_dir():
            shutil.copytree(src, source / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            shutil.copy2(src, source / name)
    run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(root / "dist"),
         str(source)], cwd=root)
    [wheel] = list((root / "dist").glob("mmfuse-*.whl"))
    venv = root / "venv"
    base_python = Path(sys.base_prefix) / "bin" / f"python{sys.version_info.major}.{sys.version_info.minor}"
    run([str(base_python), "-m", "venv", str(venv)], cwd=root)
    site = Path(sysconfig.get_paths(vars={"base": str(venv), "platbase": str(venv)})["purelib"])
    (site / "zz_mmfuse_test_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)], cwd=root)
    return venv


def test_the_wheel_serves_a_repository_made_by_init_outside_the_checkout(wheel_venv, tmp_path):
    bin_dir = wheel_venv / "bin"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    work = tmp_path / "elsewhere"
    work.mkdir()
    # Nothing with a generic name is installed, and mmfuse comes from the wheel, not from the checkout.
    probe = run([str(bin_dir / "python"), "-c",
                 "import importlib.util as u, json, mmfuse, mmfuse.clients, mmfuse.serving; "
                 "print(json.dumps([mmfuse.__file__] + [bool(u.find_spec(n)) for n in ('clients', 'python_backends')]))"],
                cwd=work, env=env)
    location, has_clients, has_backends = json.loads(probe.stdout)
    assert "site-packages" in location and str(REPO_ROOT) not in location
    assert not has_clients and not has_backends
    failed = subprocess.run([str(bin_dir / "python"), "-c", "import clients"], cwd=work, env=env,
                            capture_output=True, text=True)
    assert failed.returncode != 0 and "No module named 'clients'" in failed.stderr

    checkpoint = write_checkpoint(work / "weights" / "tiny.safetensors")
    run([str(bin_dir / "mmfuse"), "init", "repo", "--model", TINY, "--pretrained", str(checkpoint)], cwd=work, env=env)
    assert not list((work / "repo").rglob("*.py"))
    grpc, http, metrics = free_port(), free_port(), free_port()
    server = subprocess.Popen([str(bin_dir / "mmfuse"), "serve", "--model-repository", "repo", "--grpc-port", str(grpc),
                               "--http-port", str(http), "--metrics-port", str(metrics)],
                              cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while not is_ready(http) and time.monotonic() < deadline and server.poll() is None:
            time.sleep(0.5)
        assert is_ready(http), f"server not ready: {server.poll()}"
        from PIL import Image

        Image.new("RGB", (48, 40), (200, 30, 30)).save(work / "red.png")
        answer = run([str(bin_dir / "mmfuse"), "infer", "--url", f"127.0.0.1:{grpc}", "--image", "red.png",
                      "--text", "a red square", "--json"], cwd=work, env=env)
        result = json.loads(answer.stdout)
        assert result["modality_status"] == {"image": "ok", "text": "ok"}
        assert result["modality_mask"] == {"image": True, "text": True}
        assert len(result["fused"]) == 64 and abs(sum(x * x for x in result["fused"]) - 1.0) < 1e-3
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
