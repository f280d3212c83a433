"""The repository as shipped (what `mmfuse serve` and the demo serve) loads and answers correctly.

The shipped default is the demo model: tiny open_clip encoders and an attention fusion head trained
on the shapes benchmark (`mmfuse train --from-scratch`). Its served embeddings must equal open_clip
run in-process on the shipped checkpoint, and its SCORE must solve the benchmark on fresh data.
"""
from __future__ import annotations

import io
import json
import subprocess
import sys

import numpy as np
import pytest

from mmfuse import shapes
from mmfuse.repository import load_config, parameters
from tests.conftest import encode
from tests.e2e.conftest import cosine, start_server
from tests.paths import SHIPPED_REPOSITORY as DEFAULT_MODEL_REPOSITORY

pytestmark = [pytest.mark.e2e, pytest.mark.slow]  # starts a tritonserver of its own


@pytest.fixture(scope="module")
def shipped_server(tmp_path_factory):
    server = start_server(DEFAULT_MODEL_REPOSITORY, tmp_path_factory.mktemp("shipped") / "tritonserver")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def shipped_client(shipped_server):
    from mmfuse.clients import MMFuseClient

    with MMFuseClient(shipped_server.grpc_url, timeout_s=120) as client:
        yield client


def test_shipped_encoders_reproduce_open_clip_on_the_shipped_checkpoint(shipped_client, photos):
    import open_clip
    import torch
    from PIL import Image

    from mmfuse.serving.openclip_models import register_model_configs

    params = parameters(load_config(DEFAULT_MODEL_REPOSITORY, "image_encoder"))
    assert params["allow_random_init"] == "false" and params["pretrained"].endswith(".safetensors")
    checkpoint = (DEFAULT_MODEL_REPOSITORY / "image_encoder" / params["pretrained"]).resolve()
    register_model_configs()
    model, _, preprocess = open_clip.create_model_and_transforms(params["model_name"], pretrained=str(checkpoint))
    model.eval()
    tokenizer = open_clip.get_tokenizer(params["model_name"])

    image = encode(photos["astronaut"])
    caption = "a red circle left of a blue square"
    img = shipped_client.embed_image([image]).embedding[0]
    txt = shipped_client.embed_text([caption]).embedding[0]
    with torch.no_grad():
        ref_img = model.encode_image(preprocess(Image.open(io.BytesIO(image))).unsqueeze(0), normalize=True)[0]
        ref_txt = model.encode_text(tokenizer([caption]), normalize=True)[0]
    assert cosine(img, ref_img.numpy()) >= 0.999
    assert cosine(txt, ref_txt.numpy()) >= 0.999


def test_served_default_solves_the_benchmark_on_fresh_data(shipped_client):
    """>= 95 % on relation-swapped and on attribute negatives (and on positives), fresh seed."""
    examples = shapes.balanced(60, seed=20261126)
    result = shipped_client.fuse_image_text([shapes.png_bytes(e.image) for e in examples],
                                            [e.caption for e in examples])
    assert result.score is not None, "the shipped fuse_image_text must expose SCORE"
    assert np.isfinite(result.score).all()
    accuracy = {}
    for kind in shapes.KINDS:
        rows = [i for i, e in enumerate(examples) if e.kind == kind]
        accuracy[kind] = float(np.mean([(result.score[i] > 0.5) == bool(examples[i].label) for i in rows]))
    assert accuracy["swapped"] >= 0.95, accuracy
    assert accuracy["attribute"] >= 0.95, accuracy
    assert accuracy["positive"] >= 0.95, accuracy


def test_missing_modalities_give_defined_scores(shipped_client):
    example = shapes.balanced(1, seed=5)[0]
    image = shapes.png_bytes(example.image)
    result = shipped_client.fuse_image_text([image, b"", b"", b"not an image"], ["", example.caption, "", example.caption])
    assert np.isfinite(result.fused).all() and np.isfinite(result.score).all()
    assert result.mask.tolist() == [[True, False], [False, True], [False, False], [False, True]]
    assert result.score[2] == pytest.approx(0.5)  # nothing present: undecided, never NaN
    assert not result.fused[2].any()


def test_mmfuse_infer_prints_a_result(shipped_server, photos, tmp_path):
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
