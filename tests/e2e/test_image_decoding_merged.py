"""A repository whose image encoder decodes the images itself (``decode_images``), on a real tritonserver;
and `mmfuse apply-profile cpu`, which gives one, on the user's model.

``mmfuse.repository.merge_image_decoding`` folds image_preprocess into image_encoder (one process per
instance instead of two; the bench's cpu profile serves it). The public ensembles must not notice: same
tensors, same embeddings, and a malformed image still masks only its own row.
"""
from __future__ import annotations

import numpy as np
import pytest

from mmfuse.reconfigure import check_python_model
from mmfuse.repository import load_config, merge_image_decoding, set_parameters
from tests.conftest import encode
from tests.e2e.conftest import cosine, start_server, tiny_repository

pytestmark = [pytest.mark.e2e, pytest.mark.slow]  # starts a tritonserver of its own

CAPTIONS = ["an astronaut in a white suit", "a cup of coffee on a saucer", "a cat"]


@pytest.fixture(scope="module")
def merged(tmp_path_factory, checkpoint):
    repo = tiny_repository(tmp_path_factory.mktemp("merged") / "model_repository", checkpoint)
    set_parameters(repo, "image_preprocess", {"jpeg_draft": "false", "max_image_bytes": "1000000"})
    assert merge_image_decoding(repo) == ["embed_image", "fuse_image_text", "fuse_image_text_tabular"]
    set_parameters(repo, "image_encoder", {"decode_threads": "1"})
    server = start_server(repo, tmp_path_factory.mktemp("merged-logs") / "tritonserver")
    yield server, repo
    server.stop()


@pytest.fixture(scope="module")
def photo_bytes(photos):
    return [encode(photos["astronaut"], "JPEG", quality=90), encode(photos["coffee"], "PNG"),
            encode(photos["chelsea"], "WEBP", quality=90)]


def test_the_merged_repository_validates_offline(merged):
    _, repo = merged
    assert check_python_model("image_encoder", load_config(repo, "image_encoder"), repo / "image_encoder") == []


def test_no_preprocessing_model_is_served(merged):
    import tritonclient.grpc as grpcclient

    server, _ = merged
    with grpcclient.InferenceServerClient(server.grpc_url) as client:
        names = {m["name"] for m in client.get_model_repository_index(as_json=True)["models"]}
        assert "image_preprocess" not in names and client.is_model_ready("embed_image")
        inputs = client.get_model_metadata("image_encoder", as_json=True)["inputs"]
    assert [(i["name"], i["datatype"]) for i in inputs] == [("IMAGE", "BYTES")]


def test_embed_image_matches_open_clip_and_masks_bad_rows(merged, reference, photo_bytes):
    from mmfuse.clients import MMFuseClient

    server, _ = merged
    truncated = photo_bytes[0][: len(photo_bytes[0]) // 3]
    with MMFuseClient(server.grpc_url, timeout_s=60) as client:
        result = client.embed_image([photo_bytes[0], truncated, b"", photo_bytes[1], b"x" * 1_000_001, photo_bytes[2]])
    assert result.status == ["ok", "undecodable", "missing", "ok", "too_large", "ok"]
    assert result.valid.tolist() == [True, False, False, True, False, True]
    assert not result.embedding[[1, 2, 4]].any()
    for row, data in ((0, photo_bytes[0]), (3, photo_bytes[1]), (5, photo_bytes[2])):
        assert cosine(result.embedding[row], reference.image(data)) >= 0.999


def test_fuse_image_text_keeps_the_text_path_of_a_malformed_image(merged, reference, photo_bytes):
    from mmfuse.clients import MMFuseClient

    server, _ = merged
    with MMFuseClient(server.grpc_url, timeout_s=60) as client:
        clean = client.fuse_image_text(photo_bytes, CAPTIONS)
        corrupt = client.fuse_image_text([photo_bytes[0], b"\xff\xd8\xff broken", photo_bytes[2]], CAPTIONS)
    assert clean.mask.all() and clean.status == [["ok", "ok"]] * 3
    assert corrupt.mask.tolist() == [[True, True], [False, True], [True, True]]
    assert corrupt.status[1] == ["undecodable", "ok"]
    np.testing.assert_allclose(corrupt.fused[[0, 2]], clean.fused[[0, 2]], atol=1e-5)
    text_only = reference.text(CAPTIONS[1])
    assert cosine(corrupt.fused[1], text_only) >= 0.999  # late fusion of the caption alone
    for data, text, fused in zip(photo_bytes, CAPTIONS, clean.fused):
        expected = 0.5 * reference.image(data) + 0.5 * reference.text(text)
        assert cosine(fused, expected) >= 0.999


# -- `mmfuse apply-profile cpu`: the bench's cpu settings on the user's models, served --------------------------------
@pytest.fixture(scope="module")
def tuned(tmp_path_factory, checkpoint):
    from mmfuse.cli import main

    source = tiny_repository(tmp_path_factory.mktemp("untuned") / "model_repository", checkpoint)
    out = tmp_path_factory.mktemp("tuned") / "model_repository"
    assert main(["apply-profile", "cpu", "--model-repository", str(source), "--out", str(out)]) == 0
    server = start_server(out, tmp_path_factory.mktemp("tuned-logs") / "tritonserver")
    yield server
    server.stop()


def test_the_cpu_profile_serves_the_users_model(tuned, reference, photo_bytes):
    import tritonclient.grpc as grpcclient

    from mmfuse.clients import MMFuseClient

    with grpcclient.InferenceServerClient(tuned.grpc_url) as client:
        config = client.get_model_config("image_encoder", as_json=True)["config"]
    assert int(config["instance_group"][0]["count"]) == 2  # one per core, as the profile measured
    assert config["parameters"]["decode_images"]["string_value"] == "true"
    assert config["parameters"]["precision"]["string_value"] == "auto"  # bf16 where the CPU has bf16 units
    with MMFuseClient(tuned.grpc_url, timeout_s=60) as client:
        images = client.embed_image(photo_bytes)
        fused = client.fuse_image_text(photo_bytes, CAPTIONS)
    assert images.status == ["ok"] * 3 and fused.status == [["ok", "ok"]] * 3
    # bf16, OpenVINO, reduced-size decoding: within the profile's tolerance of open_clip fp32 with exact decoding.
    for data, text, image, both in zip(photo_bytes, CAPTIONS, images.embedding, fused.fused):
        assert cosine(image, reference.image(data)) >= 0.99
        expected = 0.5 * reference.image(data) + 0.5 * reference.text(text)
        assert cosine(both, expected) >= 0.99
