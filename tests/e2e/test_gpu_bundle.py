"""The GPU bundle (scripts/gpu-bundle.sh): layout, size and manifest of a bundle someone built.

Building one needs the network (pip download for the target CPython), so CI does not: set MMFUSE_GPU_BUNDLE to a
bundle's path to run these, e.g. after `bash scripts/gpu-bundle.sh /tmp/b.tar.xz --python 3.11`. The on-host half
(scripts/gpu-check.sh: install offline, serve, answer, perf_analyzer) is docs/deploy.md's "GPU bundle".
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

BUNDLE = os.environ.get("MMFUSE_GPU_BUNDLE", "")
MAX_BYTES = 60 * 2**20

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (BUNDLE and Path(BUNDLE).is_file()),
                       reason="set MMFUSE_GPU_BUNDLE to a bundle of scripts/gpu-bundle.sh (building one needs the network)"),
]


@pytest.fixture(scope="module")
def unpacked(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("gpu-bundle")
    with tarfile.open(BUNDLE, "r:*") as tar:  # xz with a 256 MiB dictionary: Python's lzma reads it
        tar.extractall(root, filter="data")
    return root / "mmfuse-gpu-bundle"


@pytest.fixture(scope="module")
def manifest(unpacked) -> dict:
    return json.loads((unpacked / "MANIFEST.json").read_text())


def test_the_bundle_fits_in_60_mib():
    assert Path(BUNDLE).stat().st_size <= MAX_BYTES, f"{BUNDLE}: {Path(BUNDLE).stat().st_size / 2**20:.1f} MiB"


def test_every_file_matches_the_manifest_and_nothing_else_is_there(unpacked, manifest):
    on_disk = {str(p.relative_to(unpacked)) for p in unpacked.rglob("*") if p.is_file() or p.is_symlink()}
    assert on_disk == set(manifest["files"]) | set(manifest["links"]) | {"MANIFEST.json"}
    for rel, entry in manifest["files"].items():
        data = (unpacked / rel).read_bytes()
        assert (len(data), hashlib.sha256(data).hexdigest()) == (entry["bytes"], entry["sha256"]), rel
    for rel in manifest["links"]:  # perf_analyzer's plain-named libraries point into the bundle
        assert (unpacked / rel).resolve().is_file() and (unpacked / rel).resolve().is_relative_to(unpacked.resolve())


def test_layout_serves_with_mmfuse_tritonserver(unpacked, manifest):
    py = manifest["python"]
    tritonserver = unpacked / manifest["tritonserver"]["binary"]
    backends = unpacked / manifest["tritonserver"]["backend_dir"]
    # MMFUSE_TRITONSERVER=<binary>: mmfuse.server takes the backends from ../backends and caches from ../caches
    assert tritonserver.parent.parent / "backends" == backends
    for path in (tritonserver, backends / "python" / "libtriton_python.so",
                 backends / "python" / "triton_python_backend_utils.py",
                 backends.parent / "caches" / "local" / "libtritoncache_local.so",
                 unpacked / manifest["tritonserver"]["stub"], unpacked / "perf_analyzer" / "bin" / "perf_analyzer"):
        assert path.is_file(), path
    assert os.access(tritonserver, os.X_OK) and os.access(unpacked / "gpu-check.sh", os.X_OK)
    assert [p.name for p in (backends.parent / "python_backend_stubs").iterdir()] == [py]  # one stub: the host's
    for name in ("embed_image", "embed_text", "fuse_image_text"):
        assert (unpacked / "model_repository" / name / "config.pbtxt").is_file()
    assert {p.name for p in (unpacked / "perf_analyzer" / "lib").iterdir()} == {"libb64.so.0d", "libcudart.so.12"}


def test_only_needed_libraries_and_every_needed_one(unpacked, manifest):
    libs = unpacked / "triton" / "nvidia_pytriton.libs"
    present = {p.name for p in libs.iterdir()}
    assert present == set(manifest["libraries"]["bundled"])
    assert any(n.startswith("libtritonserver-") for n in present)
    assert not any(n.startswith("libpython3-") for n in present)  # the wheel's libpython 3.13 links nothing here
    if shutil.which("readelf") is None:
        pytest.skip("readelf is not installed: NEEDED not checked")
    elves = [p for p in unpacked.joinpath("triton").rglob("*") if p.is_file() and p.read_bytes()[:4] == b"\x7fELF"]
    for elf in elves:
        out = subprocess.run(["readelf", "-d", str(elf)], capture_output=True, text=True, check=True).stdout
        for needed in re.findall(r"\(NEEDED\)\s+Shared library: \[(.+?)\]", out):
            if re.search(r"-[0-9a-f]{8}\.so", needed):  # an auditwheel-hashed name: must travel with the bundle
                assert needed in present, f"{elf.name} needs {needed}"


def test_wheels_are_for_the_target_python_and_leave_torch_to_the_host(manifest):
    tag = "cp" + manifest["python"].replace(".", "")
    wheels = manifest["wheels"]
    names = {re.split(r"-\d", w, maxsplit=1)[0].lower().replace("_", "-") for w in wheels}
    assert {"mmfuse", "numpy", "open-clip-torch", "tritonclient", "timm", "ftfy", "regex", "huggingface-hub",
            "safetensors", "tqdm", "grpcio"} <= names
    assert not names & {"torch", "torchvision"}
    [numpy] = [w for w in wheels if w.startswith("numpy-")]
    assert numpy.startswith(f"numpy-1.26.4-{tag}-{tag}-")  # numpy<2: Triton 2.51's stub (shared notes, trap 1)
    for wheel in wheels:
        python_tag = wheel.split("-")[-3]
        assert python_tag.startswith(("py3", "cp3")) and (not python_tag.startswith("cp") or "abi3" in wheel
                                                          or python_tag == tag), wheel
