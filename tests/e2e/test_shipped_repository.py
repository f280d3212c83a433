"""The repository as shipped (what `mmfuse serve` and the demo serve) loads and answers correctly."""
from __future__ import annotations

import numpy as np
import pytest

from mmfuse.server import DEFAULT_MODEL_REPOSITORY
from mmfuse.repository import load_config, parameters
from tests.conftest import encode
from tests.e2e.conftest import cosine, start_server

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def shipped_server(tmp_path_factory):
    server = start_server(DEFAULT_MODEL_REPOSITORY, tmp_path_factory.mktemp("shipped") / "tritonserver")
    yield server
    server.stop()


def test_shipped_repository_reproduces_its_configured_model(shipped_server, photos):
    import open_clip
    import torch
    from PIL import Image
    import io

    from clients import MMFuseClient
    from python_backends.openclip_models import register_model_configs

    params = parameters(load_config(DEFAULT_MODEL_REPOSITORY, "image_encoder"))
    assert params["allow_random_init"] == "true" and not params["pretrained"]
    register_model_configs()
    torch.manual_seed(int(params["seed"]))
    model, _, preprocess = open_clip.create_model_and_transforms(params["model_name"], pretrained=None)
    model.eval()
    tokenizer = open_clip.get_tokenizer(params["model_name"])

    image = encode(photos["astronaut"])
    with MMFuseClient(shipped_server.grpc_url) as client:
        fused = client.fuse_image_text([image], ["an astronaut"])
        img = client.embed_image([image]).embedding[0]
        txt = client.embed_text(["an astronaut"]).embedding[0]
    with torch.no_grad():
        ref_img = model.encode_image(preprocess(Image.open(io.BytesIO(image))).unsqueeze(0), normalize=True)[0]
        ref_txt = model.encode_text(tokenizer(["an astronaut"]), normalize=True)[0]
    assert cosine(img, ref_img.numpy()) >= 0.999
    assert cosine(txt, ref_txt.numpy()) >= 0.999
    assert fused.mask.all() and np.isfinite(fused.fused).all()


def test_mmfuse_infer_prints_a_result(shipped_server, photos, tmp_path):
    import json
    import subprocess
    import sys

    path = tmp_path / "chelsea.jpg"
    path.write_bytes(encode(photos["chelsea"]))
    out = subprocess.run(
        [sys.executable, "-m", "mmfuse.cli", "infer", "--image", str(path), "--text", "a cat",
         "--url", shipped_server.grpc_url, "--json"],
        capture_output=True, text=True, timeout=120, check=True,
    )
    payload = json.loads(out.stdout)
    assert payload["modality_status"] == {"image": "ok", "text": "ok"}
    assert len(payload["fused"]) == 64
