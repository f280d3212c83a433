"""A real tritonserver for the end-to-end tests.

The session server serves a copy of the shipped model repository whose encoders
load a checkpoint file the tests write (safetensors, seed 1234), so that the
checkpoint path of the loader is exercised and the reference model in this
process is exactly the served one. Nothing is mocked: a missing tritonserver or
open_clip is an error, never a skip.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from mmfuse.repository import copy_repository, set_parameters
from mmfuse.server import ServerConfig, ServerError, TritonServer
from tests.paths import SHIPPED_REPOSITORY as DEFAULT_MODEL_REPOSITORY

CHECKPOINT_SEED = 1234
MAX_IMAGE_BYTES = 3_000_000
MAX_TEXT_CHARS = 1000


def start_server(repository: Path, log_path: Path, attempts: int = 3, **config) -> TritonServer:
    """Start on free ports and wait for readiness; retry if a port was taken meanwhile."""
    error = None
    for attempt in range(attempts):
        server = TritonServer(ServerConfig.on_free_ports(model_repository=repository, **config),
                              log_path=log_path.with_suffix(f".{attempt}.log"))
        try:
            return server.__enter__()
        except ServerError as err:
            error = err
    raise error


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory) -> Path:
    import open_clip
    import torch
    from safetensors.torch import save_file

    from mmfuse.serving.openclip_models import register_model_configs

    register_model_configs()
    torch.manual_seed(CHECKPOINT_SEED)
    model = open_clip.create_model("mmfuse-tiny", pretrained=None)
    path = tmp_path_factory.mktemp("weights") / "mmfuse-tiny-test.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def tiny_repository(target: Path, checkpoint: Path) -> Path:
    """The shipped repository with the tiny architecture on a test checkpoint and plain late fusion."""
    from mmfuse.export import OPEN_CLIP_MODELS, set_fusion_head

    repo = copy_repository(DEFAULT_MODEL_REPOSITORY, target)
    for model in OPEN_CLIP_MODELS:
        values = {"model_name": "mmfuse-tiny", "pretrained": str(checkpoint)}
        if model.endswith("encoder"):
            values["allow_random_init"] = "false"
        set_parameters(repo, model, values)
    # Late fusion (the masked weighted mean) with a CLIP-style similarity head, so that SCORE exists as
    # in the shipped fuse_image_text; its weights are fixed numbers, not trained.
    set_parameters(repo, "fusion", {
        "weights": "0.5,0.5", "normalize": "true", "allow_random_init": "true",
        "strategy_options": json.dumps({"embed_dim": 64, "gate": "fixed", "head": "similarity"}),
    })
    set_fusion_head(repo, "fusion", "late", "", has_head=True)
    return repo


@pytest.fixture(scope="session")
def e2e_repository(tmp_path_factory, checkpoint) -> Path:
    repo = tiny_repository(tmp_path_factory.mktemp("e2e") / "model_repository", checkpoint)
    set_parameters(repo, "image_preprocess", {"max_image_bytes": str(MAX_IMAGE_BYTES)})
    set_parameters(repo, "text_preprocess", {"max_text_chars": str(MAX_TEXT_CHARS)})
    return repo


@pytest.fixture(scope="session")
def server(e2e_repository, tmp_path_factory):
    server = start_server(e2e_repository, tmp_path_factory.mktemp("logs") / "tritonserver")
    yield server
    server.stop()


@pytest.fixture(scope="session")
def client(server):
    from mmfuse.clients import MMFuseClient

    with MMFuseClient(server.grpc_url, timeout_s=60) as client:
        yield client


class Reference:
    """open_clip run in this process on the same weights: what the server must reproduce."""

    def __init__(self, checkpoint: Path):
        import open_clip

        from mmfuse.serving.openclip_models import register_model_configs

        register_model_configs()
        self.model, _, self.preprocess = open_clip.create_model_and_transforms(
            "mmfuse-tiny", pretrained=str(checkpoint))
        self.model.eval()
        self.tokenizer = open_clip.get_tokenizer("mmfuse-tiny")

    def image(self, data: bytes) -> np.ndarray:
        import io

        import torch
        from PIL import Image

        with torch.no_grad():
            x = self.preprocess(Image.open(io.BytesIO(data))).unsqueeze(0)
            return self.model.encode_image(x, normalize=True)[0].numpy()

    def text(self, text: str) -> np.ndarray:
        import torch

        with torch.no_grad():
            return self.model.encode_text(self.tokenizer([text]), normalize=True)[0].numpy()


@pytest.fixture(scope="session")
def reference(checkpoint) -> Reference:
    return Reference(checkpoint)


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


@pytest.fixture(scope="module")
def images(photos):
    """Three real photographs as JPEG, PNG and WebP bytes."""
    from tests.conftest import encode

    return [encode(photos["astronaut"], "JPEG", quality=90), encode(photos["coffee"], "PNG"),
            encode(photos["chelsea"], "WEBP", quality=90)]
