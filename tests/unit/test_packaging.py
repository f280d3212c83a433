"""One distribution, one top-level name, and each extra importing only what it needs."""
from __future__ import annotations

import subprocess
import sys

import tomllib

from tests.paths import REPO_ROOT


def _modules_after(code: str) -> set[str]:
    out = subprocess.run([sys.executable, "-c", code + "; import sys; print(' '.join(sorted(sys.modules)))"],
                         capture_output=True, text=True, check=True, cwd="/")
    return set(out.stdout.split())


def test_the_client_never_imports_server_code():
    loaded = _modules_after("import mmfuse.clients, mmfuse.clients.ensembles")
    assert not {m for m in loaded if m.split(".")[0] in ("torch", "open_clip", "torchvision")}
    assert not {m for m in loaded if m.startswith(("mmfuse.serving", "mmfuse.server", "mmfuse.bench", "mmfuse.eval"))}


def test_the_serving_core_needs_no_client_or_tools_package():
    loaded = _modules_after("import mmfuse.serving.adapter, mmfuse.serving.fusion, mmfuse.serving.handler, "
                            "mmfuse.serving.image_preprocess, mmfuse.serving.text_preprocess")
    assert not {m for m in loaded if m.split(".")[0] in ("tritonclient", "grpc", "matplotlib", "tqdm")}


def test_the_command_line_starts_without_the_extras_loaded():
    loaded = _modules_after("from mmfuse.cli import build_parser; build_parser()")
    assert not {m for m in loaded if m.split(".")[0] in ("tritonclient", "torch", "open_clip", "matplotlib")}


def test_everything_installs_under_the_mmfuse_name():
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    setuptools = project["tool"]["setuptools"]
    assert all(p == "mmfuse" or p.startswith("mmfuse.") for p in setuptools["packages"])
    assert setuptools["package-dir"] == {"mmfuse.serving": "python_backends", "mmfuse.clients": "clients",
                                         "mmfuse.model_repository": "model_repository"}
    extras = project["project"]["optional-dependencies"]
    assert {"client", "server", "tools", "test"} <= set(extras)
    assert any(d.startswith("nvidia-pytriton") for d in extras["server"])
    core = " ".join(project["project"]["dependencies"])
    assert "tritonclient" not in core and "matplotlib" not in core


def test_no_module_is_importable_under_a_generic_name():
    for name in ("clients", "python_backends"):
        code = subprocess.run([sys.executable, "-c", f"import {name}"], capture_output=True, cwd="/").returncode
        assert code != 0, f"`import {name}` works outside the checkout"
