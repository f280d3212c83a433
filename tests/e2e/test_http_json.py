"""Images from JSON clients: over Triton's HTTP/REST endpoint a BYTES element is a JSON string, so an image
travels as base64 or as a data URI (what curl, browsers and infinity-emb / clip-as-service users send)."""
from __future__ import annotations

import base64
import json
import urllib.request

import numpy as np
import pytest

from tests.conftest import encode

pytestmark = pytest.mark.e2e


def post_json(server, model: str, body: dict) -> dict:
    request = urllib.request.Request(f"http://{server.http_url}/v2/models/{model}/infer", method="POST",
                                     data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())


def outputs(answer: dict) -> dict:
    return {o["name"]: o for o in answer["outputs"]}


def test_base64_and_data_uri_images_over_http_json_equal_raw_bytes_over_grpc(server, client, photos):
    raw = encode(photos["astronaut"], "JPEG", quality=90)
    text = base64.b64encode(raw).decode()
    rows = [f"data:image/jpeg;base64,{text}", text, "data:image/png,not-base64", ""]
    answer = outputs(post_json(server, "embed_image", {"inputs": [
        {"name": "IMAGE", "shape": [len(rows), 1], "datatype": "BYTES", "data": rows}]}))
    assert answer["STATUS"]["data"] == ["ok", "ok", "undecodable", "missing"]
    assert answer["VALID"]["data"] == [True, True, False, False]
    embedding = np.asarray(answer["EMBEDDING"]["data"], np.float32).reshape(answer["EMBEDDING"]["shape"])
    reference = client.embed_image([raw]).embedding[0]
    np.testing.assert_allclose(embedding[0], reference, atol=1e-6)
    np.testing.assert_allclose(embedding[1], reference, atol=1e-6)
    assert not embedding[2:].any()


def test_fuse_image_text_over_http_json(server, photos):
    raw = encode(photos["coffee"], "PNG")
    answer = outputs(post_json(server, "fuse_image_text", {"inputs": [
        {"name": "IMAGE", "shape": [1, 1], "datatype": "BYTES",
         "data": ["data:image/png;base64," + base64.b64encode(raw).decode()]},
        {"name": "TEXT", "shape": [1, 1], "datatype": "BYTES", "data": ["a cup of coffee"]}]}))
    assert answer["MODALITY_STATUS"]["data"] == ["ok", "ok"] and answer["MODALITY_MASK"]["data"] == [True, True]
