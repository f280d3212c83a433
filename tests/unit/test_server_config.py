"""mmfuse.server.ServerConfig: the tritonserver command line it builds."""
from __future__ import annotations

from pathlib import Path

from mmfuse.server import ServerConfig, TritonInstall, find_triton


def test_no_response_cache_by_default():
    install = TritonInstall(Path("/x/bin/tritonserver"), Path("/x/backends"))
    assert not [a for a in ServerConfig().command(install) if "cache" in a]


def test_response_cache_uses_the_local_cache_of_the_installed_server():
    install = find_triton()  # the real tritonserver of the nvidia-pytriton wheel
    args = ServerConfig(response_cache_bytes=16 << 20).command(install)
    assert f"--cache-config=local,size={16 << 20}" in args
    directory = [a.split("=", 1)[1] for a in args if a.startswith("--cache-directory=")]
    assert len(directory) == 1 and (Path(directory[0]) / "local" / "libtritoncache_local.so").is_file()
