"""Every fusion strategy, selected by editing parameters only, served by the real tritonserver.

One server in explicit model-control mode; each strategy is applied with Triton's load API and a
config override (parameters only), and the served FUSED / SCORE are checked against the same
strategy (same seed) run in this process on open_clip's outputs for the same inputs.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from google.protobuf import json_format

from mmfuse import shapes
from mmfuse.repository import load_config
from mmfuse.wire import bytes_column
from tests.e2e.conftest import start_server, tiny_repository

pytestmark = [pytest.mark.e2e, pytest.mark.slow]  # starts a tritonserver of its own

SEED = 7
CASES = {
    "late-gmu": ("late", {"gate": "gmu", "head": "similarity"}),
    "early": ("early", {"hidden": 32}),
    "hybrid": ("hybrid", {"widths": [64, 64], "dim": 32, "heads": 2, "layers": 1}),
    "attention": ("attention", {"image_width": 64, "text_width": 64, "dim": 32, "heads": 2, "layers": 1,
                                "image_tokens": 16}),
    "attention-llava": ("attention", {"image_width": 64, "text_width": 64, "dim": 32, "heads": 2, "layers": 1,
                                      "projector": "llava"}),
}


@pytest.fixture(scope="module")
def explicit_server(tmp_path_factory, checkpoint):
    repo = tiny_repository(tmp_path_factory.mktemp("strategies") / "repo", checkpoint)
    server = start_server(repo, tmp_path_factory.mktemp("strategies-logs") / "tritonserver",
                          model_control_mode="explicit")
    server.repository = repo
    yield server
    server.stop()


@pytest.fixture(scope="module")
def examples():
    return shapes.balanced(2, seed=123)  # 6 rows: two of each kind


@pytest.fixture(scope="module")
def in_process(checkpoint, examples):
    """What the encoders give for the examples' PNG bytes, computed here with open_clip."""
    import io

    from PIL import Image

    from mmfuse.training import Encoders, create_clip
    from tests.e2e.conftest import Reference

    clip = create_clip("mmfuse-tiny", 0, checkpoint).eval()
    preprocess = Reference(checkpoint).preprocess
    pixels = torch.stack([preprocess(Image.open(io.BytesIO(shapes.png_bytes(e.image)))) for e in examples])
    import open_clip

    tokens = open_clip.get_tokenizer("mmfuse-tiny")([e.caption for e in examples])
    with torch.no_grad():
        return Encoders(clip)(pixels, tokens)


def _apply(server, strategy: str, options: dict, score: bool) -> None:
    import tritonclient.grpc as grpcclient

    repo = server.repository
    client = grpcclient.InferenceServerClient(server.grpc_url)
    fusion = load_config(repo, "fusion")
    fusion.parameters["strategy"].string_value = strategy
    fusion.parameters["allow_random_init"].string_value = "true"
    fusion.parameters["seed"].string_value = str(SEED)
    fusion.parameters["strategy_options"].string_value = json.dumps({"embed_dim": 64, **options})
    client.load_model("fusion", config=json_format.MessageToJson(fusion))
    ensemble = load_config(repo, "fuse_image_text")
    if score and "SCORE" not in [o.name for o in ensemble.output]:
        for step in ensemble.ensemble_scheduling.step:
            if step.model_name == "fusion":
                step.output_map["SCORE"] = "SCORE"
        ensemble.output.add(name="SCORE", data_type=ensemble.output[0].data_type, dims=[1])
    client.load_model("fuse_image_text", config=json_format.MessageToJson(ensemble))
    assert client.is_model_ready("fuse_image_text")


@pytest.mark.parametrize("case", list(CASES))
def test_strategy_selected_by_parameters_matches_in_process(case, explicit_server, examples, in_process):
    from mmfuse.clients import MMFuseClient
    from mmfuse.serving.strategies import FusionBatch, build

    strategy, options = CASES[case]
    torch.manual_seed(SEED)
    module = build(strategy, ("IMAGE", "TEXT"), 64, **options).eval()
    _apply(explicit_server, strategy, options, score=module.has_head)

    images = [shapes.png_bytes(e.image) for e in examples]
    texts = [e.caption for e in examples]
    images[1], texts[2] = b"", ""  # one row without its image, one without its text
    with MMFuseClient(explicit_server.grpc_url) as client:
        outputs = ["FUSED", "MODALITY_MASK"] + (["SCORE"] if module.has_head else [])
        columns = {"IMAGE": bytes_column(images), "TEXT": bytes_column(texts)}
        served = client.infer("fuse_image_text", columns, outputs)

    embeddings, sequences, masks = in_process
    present = torch.ones(len(examples), 2, dtype=torch.bool)
    present[1, 0] = present[2, 1] = False
    with torch.no_grad():
        expected = module(FusionBatch(embeddings * present.unsqueeze(-1), present, sequences, masks))
    np.testing.assert_array_equal(served["MODALITY_MASK"], present.numpy())
    np.testing.assert_allclose(served["FUSED"], expected.fused.numpy(), atol=2e-4)
    assert np.isfinite(served["FUSED"]).all()
    if module.has_head:
        np.testing.assert_allclose(served["SCORE"][:, 0], torch.sigmoid(expected.logit).numpy(), atol=2e-4)


def test_fuse_embeddings_runs_only_the_fusion_step(client, photos):
    from tests.conftest import encode

    images = [encode(photos["astronaut"]), b""]
    texts = ["an astronaut", "a cat"]
    fused = client.fuse_image_text(images, texts)
    img, txt = client.embed_image(images), client.embed_text(texts)
    out = client.infer("fuse_embeddings", {
        "IMAGE_EMBEDDING": img.embedding, "IMAGE_VALID": img.valid.reshape(-1, 1),
        "TEXT_EMBEDDING": txt.embedding, "TEXT_VALID": txt.valid.reshape(-1, 1)},
        ["FUSED", "MODALITY_MASK", "MODALITY_STATUS"])
    np.testing.assert_allclose(out["FUSED"], fused.fused, atol=1e-5)
    assert out["MODALITY_MASK"].tolist() == [[True, True], [False, True]]
    assert [[s.decode() for s in row] for row in out["MODALITY_STATUS"]] == [["ok", "ok"], ["missing", "ok"]]
