"""The three public ensembles over gRPC on a real tritonserver, checked against open_clip in-process."""
from __future__ import annotations

import numpy as np
import pytest

from tests.conftest import encode
from tests.e2e.conftest import MAX_IMAGE_BYTES, MAX_TEXT_CHARS, cosine

pytestmark = pytest.mark.e2e

CAPTIONS = ["an astronaut in a white suit", "a cup of coffee on a saucer", "a cat", "x"]


@pytest.fixture(scope="module")
def photo_bytes(photos):
    return [
        encode(photos["astronaut"], "JPEG", quality=90),
        encode(photos["coffee"], "PNG"),
        encode(photos["chelsea"], "WEBP", quality=90),
        encode(photos["coffee"][:200, :300], "BMP"),
    ]


def test_server_lists_the_public_ensembles(server):
    import tritonclient.grpc as grpcclient

    c = grpcclient.InferenceServerClient(server.grpc_url)
    for name in ("embed_image", "embed_text", "fuse_image_text"):
        assert c.is_model_ready(name), name
    meta = c.get_model_metadata("fuse_image_text", as_json=True)
    assert {i["name"]: i["datatype"] for i in meta["inputs"]} == {"IMAGE": "BYTES", "TEXT": "BYTES"}
    outputs = {o["name"]: (o["datatype"], o["shape"]) for o in meta["outputs"]}
    assert outputs["MODALITY_MASK"] == ("BOOL", ["-1", "2"])
    assert outputs["MODALITY_STATUS"] == ("BYTES", ["-1", "2"])
    assert outputs["FUSED"][0] == "FP32"


def test_embed_image_matches_open_clip(client, reference, photo_bytes):
    result = client.embed_image(photo_bytes)
    assert result.embedding.dtype == np.float32
    assert result.valid.tolist() == [True] * 4
    assert result.status == ["ok"] * 4
    for data, served in zip(photo_bytes, result.embedding):
        assert cosine(served, reference.image(data)) >= 0.999
        assert np.linalg.norm(served) == pytest.approx(1.0, abs=1e-4)


def test_embed_text_matches_open_clip(client, reference):
    result = client.embed_text(CAPTIONS)
    assert result.valid.all()
    for text, served in zip(CAPTIONS, result.embedding):
        assert cosine(served, reference.text(text)) >= 0.999


def test_fuse_is_the_weighted_mean_of_the_references(client, reference, photo_bytes):
    result = client.fuse_image_text(photo_bytes, CAPTIONS)
    assert result.mask.all()
    assert result.status == [["ok", "ok"]] * 4
    for data, text, fused in zip(photo_bytes, CAPTIONS, result.fused):
        expected = 0.5 * reference.image(data) + 0.5 * reference.text(text)
        assert cosine(fused, expected / np.linalg.norm(expected)) >= 0.999


def test_corrupt_jpeg_masks_its_row_and_leaves_the_others_equal(client, photo_bytes):
    clean = client.fuse_image_text(photo_bytes, CAPTIONS)
    corrupt = photo_bytes[0][: len(photo_bytes[0]) // 3]  # truncated JPEG
    batch = [photo_bytes[0], corrupt, photo_bytes[2], photo_bytes[3]]
    result = client.fuse_image_text(batch, CAPTIONS)
    assert result.mask[:, 0].tolist() == [True, False, True, True]
    assert result.mask[:, 1].all(), "the text path must be untouched"
    assert result.status[1] == ["undecodable", "ok"]
    for row in (0, 2, 3):
        np.testing.assert_allclose(result.fused[row], clean.fused[row], atol=1e-5)
    # The masked row is the text alone.
    text_only = client.embed_text([CAPTIONS[1]]).embedding[0]
    assert cosine(result.fused[1], text_only) >= 0.999


def test_garbage_and_wrong_magic_bytes_are_undecodable(client, photo_bytes):
    png_with_jpeg_magic = b"\xff\xd8\xff\xe0" + photo_bytes[1][4:]
    result = client.embed_image([b"not an image at all", png_with_jpeg_magic, photo_bytes[0]])
    assert result.status == ["undecodable", "undecodable", "ok"]
    assert result.valid.tolist() == [False, False, True]
    assert not result.embedding[:2].any()


def test_empty_text_uses_the_image_alone(client, reference, photo_bytes):
    result = client.fuse_image_text([photo_bytes[0]], [""])
    assert result.mask.tolist() == [[True, False]]
    assert result.status == [["ok", "missing"]]
    assert cosine(result.fused[0], reference.image(photo_bytes[0])) >= 0.999


def test_both_missing_is_defined(client):
    result = client.fuse_image_text([b"", None], ["", None])
    assert np.isfinite(result.fused).all()
    assert not result.fused.any()
    assert not result.mask.any()
    assert result.status == [["missing", "missing"]] * 2


def test_image_limits_come_from_parameters(client, photos):
    # Over max_image_bytes (the e2e repository sets it to MAX_IMAGE_BYTES).
    noise = np.random.default_rng(0).integers(0, 256, (1100, 1100, 3), dtype=np.uint8)
    big = encode(noise, "PNG")
    assert len(big) > MAX_IMAGE_BYTES
    # A PNG header announcing 20000 x 20000 pixels: rejected before any pixel is decoded.
    bomb = _png_header(20000, 20000)
    result = client.embed_image([big, bomb, encode(photos["chelsea"])])
    assert result.status == ["too_large", "too_large", "ok"]


def test_text_limits_and_encoding(client):
    result = client.embed_text(["a" * (MAX_TEXT_CHARS + 1), b"\xff\xfe\xfd", "   ", "caf\u00e9 \U0001F600", "ok"])
    assert result.status == ["too_large", "undecodable", "missing", "ok", "ok"]
    assert result.valid.tolist() == [False, False, False, True, True]


def test_batches_longer_than_max_batch_size_are_split_by_the_client(client):
    texts = [f"caption number {i}" for i in range(70)]  # ensembles' max_batch_size is 64
    result = client.embed_text(texts)
    assert result.embedding.shape[0] == 70 and result.valid.all()
    alone = client.embed_text([texts[66]]).embedding[0]
    np.testing.assert_allclose(result.embedding[66], alone, atol=1e-5)


def _png_header(width: int, height: int) -> bytes:
    import struct
    import zlib

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")
