"""A third modality (tabular rows) through fuse_image_text_tabular on the real server.

The tabular encoder is a new model folder, the ensemble a new config; the fusion model runs the same
fusion code with modalities image,text,tabular. The answer is checked against the other ensembles and
the tabular encoder run in this process.
"""
from __future__ import annotations

import numpy as np
import pytest

from mmfuse.repository import load_config, parameters
from mmfuse.serving.params import ModelContext, Params
from mmfuse.serving.tabular import TabularEncoder
from tests.conftest import encode
from tests.e2e.conftest import cosine

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]


def infer(server, images, texts, features):
    import tritonclient.grpc as grpcclient

    from mmfuse.wire import bytes_column, decode_statuses, infer_inputs

    arrays = {"IMAGE": bytes_column(images), "TEXT": bytes_column(texts), "FEATURES": np.asarray(features, np.float32)}
    with grpcclient.InferenceServerClient(server.grpc_url) as client:
        result = client.infer("fuse_image_text_tabular", infer_inputs(arrays))
    status = decode_statuses(result.as_numpy("MODALITY_STATUS"))
    return result.as_numpy("FUSED"), result.as_numpy("MODALITY_MASK"), status


def test_three_modalities_fuse_to_the_mean_of_the_three_embeddings(server, client, e2e_repository, photos):
    name = "tabular_encoder"
    tabular = TabularEncoder.from_parameters(
        ModelContext(name, e2e_repository / name), Params(name, parameters(load_config(e2e_repository, name))))
    rng = np.random.default_rng(7)
    features = rng.standard_normal((3, 8)).astype(np.float32)
    features[1] = np.nan  # row 1: no tabular data
    images = [encode(photos["chelsea"]), encode(photos["coffee"]), b""]
    texts = ["a cat", "a cup of coffee", "an astronaut"]

    fused, mask, status = infer(server, images, texts, features)
    assert fused.shape == (3, 64) and np.isfinite(fused).all()
    assert mask.tolist() == [[True, True, True], [True, True, False], [False, True, True]]
    assert status == [["ok", "ok", "ok"], ["ok", "ok", "missing"], ["missing", "ok", "ok"]]

    img = client.embed_image(images[:2]).embedding
    txt = client.embed_text(texts).embedding
    tab = tabular.encode(features[[0, 2]])
    # weights 1,1,1 of the shipped fusion_image_text_tabular: the normalised mean of what contributed
    assert cosine(fused[0], img[0] + txt[0] + tab[0]) > 0.9999
    assert cosine(fused[2], txt[2] + tab[1]) > 0.9999
    # Without tabular data the answer is the two-modality ensemble's (same fusion code, weights 0.5,0.5).
    two = client.fuse_image_text(images[1:2], texts[1:2]).fused[0]
    assert cosine(fused[1], two) > 0.9999
    np.testing.assert_allclose(np.linalg.norm(fused, axis=1), 1.0, rtol=1e-4)


def test_a_broken_tabular_row_is_masked_and_the_others_are_unchanged(server, photos):
    features = np.random.default_rng(3).standard_normal((2, 8)).astype(np.float32)
    alone, _, _ = infer(server, [b""], ["a cat"], features[:1])
    broken = features.copy()
    broken[1, 3] = np.inf
    fused, mask, status = infer(server, [b"", b""], ["a cat", "a dog"], broken)
    assert status[1] == ["missing", "ok", "undecodable"] and mask[1].tolist() == [False, True, False]
    np.testing.assert_allclose(fused[0], alone[0], rtol=1e-5, atol=1e-6)
