"""Security guarantees on the real server: an image URL is data, never fetched; a pickle checkpoint is refused
before anything in it runs; the serving code has no way to reach the network.
"""
from __future__ import annotations

import ast
import http.server
import pickle
import threading
from pathlib import Path

import pytest

from mmfuse.repository import copy_repository, set_parameters
from mmfuse.server import ServerError
from tests.corpus import clean_jpeg
from tests.e2e.conftest import start_server
from tests.e2e.wire import Wire, statuses
from tests.paths import REPO_ROOT

pytestmark = [pytest.mark.e2e, pytest.mark.slow]  # starts a tritonserver of its own


class Counting(http.server.BaseHTTPRequestHandler):
    hits: list[str] = []

    def do_GET(self):  # noqa: N802 - the stdlib's name
        Counting.hits.append(self.path)
        body = clean_jpeg()
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def image_host():
    """An HTTP server on 127.0.0.1 that serves a JPEG at any path and records every request."""
    Counting.hits = []
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Counting)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def test_an_image_url_is_never_fetched(server, image_host):
    import urllib.request

    url = f"http://{image_host}/cat.jpg"
    with urllib.request.urlopen(url, timeout=10) as response:  # the host works: it serves a real JPEG
        assert response.read() == clean_jpeg()
    assert Counting.hits == ["/cat.jpg"]
    Counting.hits.clear()

    urls = [url.encode(), f"https://{image_host}/a.png".encode(), f"//{image_host}/b.jpg".encode(),
            b"file:///etc/hostname", f"  {url}\n".encode()]
    with Wire(server.grpc_url) as wire:
        images = wire.rows("embed_image", {"IMAGE": urls})
        fused = wire.rows("fuse_image_text", {"IMAGE": urls, "TEXT": [b"a cat"] * len(urls)})
        texts = wire.rows("embed_text", {"TEXT": urls})  # a URL as text is just text
    assert statuses(images["STATUS"]) == [["undecodable"]] * len(urls)
    assert not images["EMBEDDING"].any()
    assert [row[0] for row in statuses(fused["MODALITY_STATUS"])] == ["undecodable"] * len(urls)
    assert statuses(texts["STATUS"]) == [["ok"]] * len(urls)
    assert Counting.hits == [], f"the server fetched {Counting.hits}"


def test_serving_code_imports_no_network_client():
    """python_backends (everything that runs per request) imports nothing that speaks HTTP or opens sockets."""
    forbidden = {"urllib.request", "urllib3", "requests", "httpx", "aiohttp", "http.client", "socket",
                 "ftplib", "smtplib", "huggingface_hub", "fsspec"}
    found = []
    for path in sorted((REPO_ROOT / "python_backends").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
            found += [f"{path.name}: {n}" for n in names if any(n == f or n.startswith(f + ".") for f in forbidden)]
    assert not found, found


class Payload:
    """Unpickling this runs Path.touch(marker): what a malicious checkpoint would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def malicious_checkpoints(directory: Path, marker: Path) -> list[Path]:
    import torch

    state = {"state_dict": {"visual.proj": torch.zeros(1)}, "evil": Payload(marker)}
    out = []
    for name in ("evil.pt", "evil.pth", "evil.bin", "evil.ckpt"):
        path = directory / name
        torch.save(state, path)  # a real torch checkpoint (zip + pickle) carrying the payload
        out.append(path)
    plain = directory / "evil-plain-pickle.pt"
    plain.write_bytes(pickle.dumps(state))
    disguised = directory / "evil.safetensors"
    disguised.write_bytes(pickle.dumps(state))
    return out + [plain, disguised]


def test_pickle_checkpoints_are_refused_before_anything_in_them_runs(tmp_path):
    from mmfuse.serving.errors import WeightsError
    from mmfuse.serving.openclip_models import ClipSpec, load_clip

    marker = tmp_path / "pwned"
    paths = malicious_checkpoints(tmp_path, marker)
    # Sanity: the payload works when a checkpoint is unpickled the unsafe way.
    import torch

    torch.load(paths[0], weights_only=False)
    assert marker.exists()
    marker.unlink()

    for path in paths:
        with pytest.raises(WeightsError) as info:
            load_clip(ClipSpec("mmfuse-tiny", pretrained=str(path)))
        assert str(path) in str(info.value)
        assert not marker.exists(), f"{path.name}: the payload ran"


def test_a_server_refuses_a_pickle_checkpoint(e2e_repository, tmp_path):
    """The real loader path in a real stub: the encoder does not load, the payload never runs."""
    marker = tmp_path / "pwned"
    evil = malicious_checkpoints(tmp_path, marker)[0]
    repo = copy_repository(e2e_repository, tmp_path / "model_repository")
    set_parameters(repo, "image_encoder", {"pretrained": str(evil)})
    with pytest.raises(ServerError) as info:  # explicit control, only this model: a failed load stops the start
        start_server(repo, tmp_path / "tritonserver", attempts=1, model_control_mode="explicit",
                     load_models=("image_encoder",),
                     extra_args=["--grpc-address=127.0.0.1", "--http-address=127.0.0.1", "--metrics-address=127.0.0.1"])
    log = "\n".join(p.read_text(errors="replace") for p in tmp_path.glob("tritonserver*.log"))
    assert "could not load checkpoint" in log and "weights_only" in log.lower(), str(info.value)[-2000:]
    assert not marker.exists(), "the checkpoint's payload ran inside the server"
