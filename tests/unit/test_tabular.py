"""The tabular third modality: python_backends/tabular.py and its model folders, without a server."""
from __future__ import annotations

import numpy as np
import pytest

from mmfuse.repository import load_config, parameters
from mmfuse.serving.errors import ConfigError, InvalidInputError
from mmfuse.serving.params import ModelContext, Params
from mmfuse.serving.tabular import TabularConfig, TabularEncoder
from tests.paths import SHIPPED_REPOSITORY as REPO

CONTEXT = ModelContext("tabular_encoder", model_dir=REPO / "tabular_encoder")


def encoder(**raw: str) -> TabularEncoder:
    params = Params("tabular_encoder", {"num_features": "4", "embed_dim": "16", **raw})
    handler = TabularEncoder.from_parameters(CONTEXT, params)
    params.reject_unknown()
    return handler


def run(handler: TabularEncoder, features) -> dict[str, np.ndarray]:
    return handler({"FEATURES": np.asarray(features, dtype=np.float32)}, frozenset({"EMBEDDING", "VALID", "STATUS"}))


def test_embeddings_are_unit_length_deterministic_and_seeded():
    x = np.random.default_rng(0).standard_normal((5, 4))
    a = run(encoder(hidden_dim="8"), x)["EMBEDDING"]
    assert a.shape == (5, 16) and a.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(a, run(encoder(hidden_dim="8"), x)["EMBEDDING"])
    assert not np.allclose(a, run(encoder(hidden_dim="8", seed="1"), x)["EMBEDDING"])
    assert not np.allclose(a, run(encoder(), x)["EMBEDDING"])  # the linear variant is another function


def test_a_row_does_not_depend_on_the_rest_of_the_batch():
    handler = encoder(hidden_dim="8")
    x = np.random.default_rng(1).standard_normal((6, 4))
    together = run(handler, x)["EMBEDDING"]
    alone = np.concatenate([run(handler, x[i: i + 1])["EMBEDDING"] for i in range(6)])
    np.testing.assert_allclose(together, alone, rtol=1e-5, atol=1e-6)


def test_missing_and_non_finite_rows_are_masked_not_failed():
    x = np.ones((4, 4), np.float32)
    x[1] = np.nan           # all NaN: the client's "no tabular data"
    x[2, 0] = np.inf        # a broken value
    x[3, 2] = np.nan        # a partly missing row
    out = run(encoder(), x)
    assert [s.decode() for s in out["STATUS"].reshape(-1)] == ["ok", "missing", "undecodable", "undecodable"]
    assert out["VALID"].reshape(-1).tolist() == [True, False, False, False]
    assert np.all(out["EMBEDDING"][1:] == 0) and np.isfinite(out["EMBEDDING"]).all()


def test_standardisation_parameters_are_applied():
    x = np.array([[1.0, 2.0, 3.0, 4.0]])
    plain = run(encoder(), x - 1.0)["EMBEDDING"]
    shifted = run(encoder(feature_mean="1,1,1,1"), x)["EMBEDDING"]
    np.testing.assert_allclose(plain, shifted, rtol=1e-5)
    scaled = run(encoder(feature_scale="2,2,2,2"), 2 * x)["EMBEDDING"]
    np.testing.assert_allclose(run(encoder(), x)["EMBEDDING"], scaled, rtol=1e-5)


@pytest.mark.parametrize("raw, fragments", [
    ({"feature_mean": "1,2"}, ("tabular_encoder", "feature_mean", "2 values", "num_features 4")),
    ({"feature_scale": "1,0,1,1"}, ("tabular_encoder", "feature_scale", "> 0")),
    ({"hidden_dim": "-3"}, ("tabular_encoder", "hidden_dim", "'-3'")),
    ({"embed_dimension": "16"}, ("tabular_encoder", "embed_dimension")),
])
def test_bad_parameters_are_refused_with_the_key_and_value(raw, fragments):
    with pytest.raises(ConfigError) as error:
        encoder(**raw)
    for fragment in fragments:
        assert fragment in str(error.value)


def test_required_parameters():
    with pytest.raises(ConfigError, match="num_features"):
        TabularConfig.from_params(Params("tabular_encoder", {"embed_dim": "8"}))


def test_a_request_of_the_wrong_width_is_an_invalid_argument():
    with pytest.raises(InvalidInputError, match="FEATURES.*3 features.*num_features 4"):
        run(encoder(), np.zeros((2, 3)))


# -- the shipped model folders ------------------------------------------------------------------------------------
def test_shipped_tabular_models_fit_together():
    from mmfuse.serving.openclip_models import ClipSpec

    tab = load_config(REPO, "tabular_encoder")
    ensemble = load_config(REPO, "fuse_image_text_tabular")
    fusion = load_config(REPO, "fusion_image_text_tabular")
    num_features = int(parameters(tab)["num_features"])
    assert list(tab.input[0].dims) == [num_features]
    assert [list(t.dims) for t in ensemble.input if t.name == "FEATURES"] == [[num_features]]
    # The tabular embedding lives in a space of the same size as the image and text towers'.
    image_params = parameters(load_config(REPO, "image_encoder"))
    spec = ClipSpec.from_params(Params("image_encoder", image_params), weights=False)
    assert int(parameters(tab)["embed_dim"]) == spec.model_config()["embed_dim"]
    modalities = parameters(fusion)["modalities"].split(",")
    assert modalities == ["image", "text", "tabular"]
    assert {t.name: list(t.dims) for t in ensemble.output}["MODALITY_MASK"] == [len(modalities)]


def test_the_three_modality_fusion_runs_the_same_code_as_fusion():
    """No fusion code for the third modality: both models name the same handler (the logic is fusion.py)."""
    handler = {name: load_config(REPO, name).parameters["handler"].string_value
               for name in ("fusion", "fusion_image_text_tabular")}
    assert handler == {"fusion": "fusion", "fusion_image_text_tabular": "fusion"}


def test_the_existing_public_ensembles_are_unchanged_by_the_third_modality():
    for name in ("embed_image", "embed_text", "fuse_image_text"):
        steps = {s.model_name for s in load_config(REPO, name).ensemble_scheduling.step}
        assert "tabular_encoder" not in steps and "fusion_image_text_tabular" not in steps
