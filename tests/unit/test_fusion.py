"""mmfuse.serving.fusion: late fusion math, its config, and the N-modality fusion handler."""
from __future__ import annotations

import numpy as np
import pytest

from mmfuse.serving.errors import ConfigError, InvalidInputError
from mmfuse.serving.fusion import FusionConfig, FusionHandler, late_fusion
from mmfuse.serving.params import ModelContext
from tests.unit.conftest import assert_names, bytes_column, decode_column, make_params

ALL_OUTPUTS = frozenset({"FUSED", "MODALITY_MASK", "MODALITY_STATUS"})


def reference_late_fusion(embeddings, mask, weights, normalize=True) -> np.ndarray:
    """The masked weighted mean written out row by row, in float64."""
    fused = np.zeros((embeddings.shape[0], embeddings.shape[2]))
    for b in range(embeddings.shape[0]):
        total = 0.0
        for n, weight in enumerate(weights):
            if mask[b, n] and weight > 0:
                fused[b] += weight * embeddings[b, n].astype(np.float64)
                total += weight
        if total > 0:
            fused[b] /= total
            if normalize:
                fused[b] /= np.linalg.norm(fused[b])
    return fused


def random_case(rng, rows=6, modalities=3, dim=8):
    embeddings = rng.standard_normal((rows, modalities, dim)).astype(np.float32)
    mask = rng.random((rows, modalities)) < 0.6
    weights = rng.uniform(0.1, 2.0, modalities)
    return embeddings, mask, weights


def unit(*values) -> np.ndarray:
    v = np.asarray(values, dtype=np.float32)
    return v / np.linalg.norm(v)


# -- late_fusion ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_late_fusion_matches_direct_computation(seed, normalize):
    embeddings, mask, weights = random_case(np.random.default_rng(seed))
    fused, contributed = late_fusion(embeddings, mask, weights, normalize=normalize)
    assert fused.dtype == np.float32 and fused.shape == (6, 8)
    np.testing.assert_allclose(fused, reference_late_fusion(embeddings, mask, weights, normalize), atol=1e-6)
    np.testing.assert_array_equal(contributed, mask)


def test_weights_are_respected():
    embeddings = np.array([[[1, 0, 0], [0, 1, 0]]], dtype=np.float32)
    fused, _ = late_fusion(embeddings, np.ones((1, 2), bool), [3.0, 1.0], normalize=False)
    np.testing.assert_allclose(fused[0], [0.75, 0.25, 0.0], atol=1e-7)
    fused, _ = late_fusion(embeddings, np.ones((1, 2), bool), [1.0, 3.0], normalize=False)
    np.testing.assert_allclose(fused[0], [0.25, 0.75, 0.0], atol=1e-7)


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("fill", [
    0.0, 1e6, -1e30,
    np.nan, np.inf, -np.inf,
])
def test_masked_modality_does_not_change_the_result(fill, normalize):
    rng = np.random.default_rng(3)
    embeddings = rng.standard_normal((4, 2, 8)).astype(np.float32)
    mask = np.array([[True, False]] * 4)
    expected, _ = late_fusion(embeddings, mask, [1.0, 1.0], normalize)
    embeddings[:, 1] = fill
    fused, contributed = late_fusion(embeddings, mask, [1.0, 1.0], normalize)
    np.testing.assert_array_equal(fused, expected)
    np.testing.assert_array_equal(contributed, mask)


@pytest.mark.parametrize("normalize", [True, False])
def test_all_absent_row_is_zeros(normalize):
    embeddings = np.random.default_rng(4).standard_normal((3, 2, 5)).astype(np.float32)
    mask = np.array([[True, True], [False, False], [False, True]])
    fused, contributed = late_fusion(embeddings, mask, [1.0, 1.0], normalize)
    assert np.isfinite(fused).all()
    np.testing.assert_array_equal(fused[1], np.zeros(5, np.float32))
    assert not contributed[1].any()
    assert np.abs(fused[[0, 2]]).sum() > 0


def test_late_fusion_is_batch_invariant():
    embeddings, mask, weights = random_case(np.random.default_rng(5), rows=9)
    mask[2] = False  # an all-absent row ...
    embeddings[2] = 1e30  # ... holding garbage
    fused, contributed = late_fusion(embeddings, mask, weights)
    for b in range(9):
        alone, alone_contributed = late_fusion(embeddings[b : b + 1], mask[b : b + 1], weights)
        np.testing.assert_array_equal(fused[b], alone[0])
        np.testing.assert_array_equal(contributed[b], alone_contributed[0])


def test_normalize_on_and_off():
    embeddings = np.array([[[1, 0], [0, 1]]], dtype=np.float32)
    mask = np.ones((1, 2), bool)
    on, _ = late_fusion(embeddings, mask, [1.0, 1.0], normalize=True)
    off, _ = late_fusion(embeddings, mask, [1.0, 1.0], normalize=False)
    np.testing.assert_allclose(off[0], [0.5, 0.5], atol=1e-7)
    np.testing.assert_allclose(on[0], unit(1, 1), atol=1e-7)


def test_zero_weight_modality_does_not_contribute():
    embeddings = np.random.default_rng(6).standard_normal((2, 2, 4)).astype(np.float32)
    fused, contributed = late_fusion(embeddings, np.ones((2, 2), bool), [1.0, 0.0], normalize=False)
    np.testing.assert_array_equal(contributed, [[True, False], [True, False]])
    np.testing.assert_allclose(fused, embeddings[:, 0], atol=1e-7)


# -- FusionConfig -------------------------------------------------------------------------------------------
def fusion_config(**raw: str) -> FusionConfig:
    return FusionConfig.from_params(make_params("fusion", **raw))


def test_config_defaults():
    assert fusion_config() == FusionConfig("late", ("IMAGE", "TEXT"), (1.0, 1.0), True)


def test_config_parses_repository_style_values():
    config = fusion_config(strategy="late", modalities="image,text,audio", weights="1,0.5,2", normalize="false")
    assert config == FusionConfig("late", ("IMAGE", "TEXT", "AUDIO"), (1.0, 0.5, 2.0), False)


@pytest.mark.parametrize("raw, fragments", [
    ({"weights": "1,1,1"}, ("fusion", "weights", "3 values", "2 modalities")),
    ({"modalities": "image,text,audio", "weights": "1,1"}, ("fusion", "weights", "2 values", "3 modalities")),
    ({"weights": "1,-0.5"}, ("fusion", "weights", "-0.5")),
    ({"weights": "1,nan"}, ("fusion", "weights", "nan")),
    ({"strategy": "magic"}, ("fusion", "strategy", "'magic'", "late")),
    ({"modalities": "image,text,IMAGE"}, ("fusion", "modalities", "IMAGE")),
])
def test_config_errors(raw, fragments):
    with pytest.raises(ConfigError) as info:
        fusion_config(**raw)
    assert_names(info.value, *fragments)


# -- FusionHandler -------------------------------------------------------------------------------------------
def make_handler(**raw: str) -> FusionHandler:
    return FusionHandler.from_parameters(ModelContext("fusion", model_dir=None), make_params("fusion", **raw))


def fusion_batch(embeddings: dict[str, np.ndarray], valid: dict[str, list[bool]], statuses=None):
    batch = {}
    for m, e in embeddings.items():
        batch[f"{m}_EMBEDDING"] = np.asarray(e, np.float32)
        batch[f"{m}_VALID"] = np.asarray(valid[m], bool).reshape(-1, 1)
    for m, s in (statuses or {}).items():
        batch[f"{m}_STATUS"] = bytes_column(s)
    return batch


def statuses_of(out) -> list[list[str]]:
    return [decode_column(row) for row in out["MODALITY_STATUS"]]


def test_handler_declares_the_n_modality_contract():
    handler = make_handler(modalities="image,text")
    names = [(spec.name, spec.optional) for spec in handler.inputs]
    assert names == [
        ("IMAGE_EMBEDDING", False), ("IMAGE_VALID", False), ("IMAGE_STATUS", True),
        ("IMAGE_SEQUENCE", True), ("IMAGE_SEQUENCE_MASK", True),
        ("TEXT_EMBEDDING", False), ("TEXT_VALID", False), ("TEXT_STATUS", True),
        ("TEXT_SEQUENCE", True), ("TEXT_SEQUENCE_MASK", True),
    ]


def test_handler_passes_statuses_through():
    rng = np.random.default_rng(7)
    batch = fusion_batch(
        {"IMAGE": rng.standard_normal((3, 4)), "TEXT": rng.standard_normal((3, 4))},
        {"IMAGE": [True, False, False], "TEXT": [False, True, False]},
        {"IMAGE": [b"ok", b"too_large", b"undecodable"], "TEXT": [b"missing", b"ok", b"too_large"]},
    )
    out = make_handler()(batch, ALL_OUTPUTS)
    assert statuses_of(out) == [["ok", "missing"], ["too_large", "ok"], ["undecodable", "too_large"]]
    np.testing.assert_array_equal(out["MODALITY_MASK"], [[True, False], [False, True], [False, False]])
    assert out["MODALITY_STATUS"].shape == (3, 2)


def test_handler_default_statuses_without_status_tensors():
    rng = np.random.default_rng(8)
    batch = fusion_batch(
        {"IMAGE": rng.standard_normal((2, 4)), "TEXT": rng.standard_normal((2, 4))},
        {"IMAGE": [True, False], "TEXT": [False, True]},
    )
    out = make_handler()(batch, ALL_OUTPUTS)
    assert statuses_of(out) == [["ok", "missing"], ["missing", "ok"]]


def test_handler_output_matches_late_fusion():
    rng = np.random.default_rng(9)
    image, text = rng.standard_normal((5, 6)), rng.standard_normal((5, 6))
    valid = {"IMAGE": [True, True, False, True, False], "TEXT": [True, False, True, True, False]}
    out = make_handler(weights="0.25,0.75")(fusion_batch({"IMAGE": image, "TEXT": text}, valid), ALL_OUTPUTS)
    mask = np.stack([valid["IMAGE"], valid["TEXT"]], axis=1)
    expected = reference_late_fusion(np.stack([image, text], axis=1).astype(np.float32), mask, (0.25, 0.75))
    np.testing.assert_allclose(out["FUSED"], expected, atol=1e-6)
    assert out["FUSED"].dtype == np.float32
    np.testing.assert_array_equal(out["MODALITY_MASK"], mask)


def test_late_fusion_output_does_not_depend_on_routed_sequences():
    """A late deployment may leave the token sequences unrouted (mmfuse bench does): the same FUSED either way."""
    rng = np.random.default_rng(3)
    image, text = rng.standard_normal((4, 6)), rng.standard_normal((4, 6))
    valid = {"IMAGE": [True, True, False, True], "TEXT": [True, False, True, True]}
    handler = make_handler()
    without = handler(fusion_batch({"IMAGE": image, "TEXT": text}, valid), ALL_OUTPUTS)
    routed = fusion_batch({"IMAGE": image, "TEXT": text}, valid)
    for m, length in (("IMAGE", 5), ("TEXT", 7)):
        routed[f"{m}_SEQUENCE"] = rng.standard_normal((4, length, 6)).astype(np.float32)
        routed[f"{m}_SEQUENCE_MASK"] = np.ones((4, length), bool)
    with_sequences = handler(routed, ALL_OUTPUTS)
    for name in ("FUSED", "MODALITY_MASK", "MODALITY_STATUS"):
        np.testing.assert_array_equal(with_sequences[name], without[name])


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_handler_marks_non_finite_valid_row(bad):
    text = np.random.default_rng(10).standard_normal((2, 4))
    image = np.ones((2, 4))
    image[1, 2] = bad
    batch = fusion_batch({"IMAGE": image, "TEXT": text}, {"IMAGE": [True, True], "TEXT": [True, True]})
    out = make_handler()(batch, ALL_OUTPUTS)
    assert statuses_of(out) == [["ok", "ok"], ["non_finite", "ok"]]
    np.testing.assert_array_equal(out["MODALITY_MASK"], [[True, True], [False, True]])
    assert np.isfinite(out["FUSED"]).all()


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_handler_non_finite_row_fuses_the_other_modalities(bad):
    text = np.random.default_rng(11).standard_normal((1, 4))
    image = np.full((1, 4), bad)
    batch = fusion_batch({"IMAGE": image, "TEXT": text}, {"IMAGE": [True], "TEXT": [True]})
    out = make_handler()(batch, ALL_OUTPUTS)
    np.testing.assert_allclose(out["FUSED"][0], unit(*text[0]), atol=1e-6)


def test_handler_is_batch_invariant_with_invalid_rows():
    rng = np.random.default_rng(12)
    image, text = rng.standard_normal((6, 4)), rng.standard_normal((6, 4))
    image[1] = 1e30  # masked garbage
    text[3] = -1e30  # masked garbage
    image[4] = 0.0  # a zero embedding that is VALID: fused from the text alone
    valid = {"IMAGE": [True, False, True, True, True, False], "TEXT": [True, True, False, False, True, False]}
    statuses = {"IMAGE": [b"ok", b"undecodable", b"ok", b"ok", b"ok", b"missing"],
                "TEXT": [b"ok", b"ok", b"too_large", b"missing", b"ok", b"missing"]}
    handler = make_handler(weights="1,2")
    out = handler(fusion_batch({"IMAGE": image, "TEXT": text}, valid, statuses), ALL_OUTPUTS)
    for b in range(6):
        one = handler(fusion_batch(
            {"IMAGE": image[b : b + 1], "TEXT": text[b : b + 1]},
            {m: v[b : b + 1] for m, v in valid.items()},
            {m: s[b : b + 1] for m, s in statuses.items()},
        ), ALL_OUTPUTS)
        for name in ALL_OUTPUTS:
            np.testing.assert_array_equal(out[name][b], one[name][0], err_msg=f"{name} row {b}")
    np.testing.assert_array_equal(out["FUSED"][5], np.zeros(4, np.float32))


def test_handler_embedding_size_mismatch():
    batch = fusion_batch({"IMAGE": np.ones((2, 8)), "TEXT": np.ones((2, 4))}, {"IMAGE": [True] * 2, "TEXT": [True] * 2})
    with pytest.raises(InvalidInputError) as info:
        make_handler()(batch, ALL_OUTPUTS)
    assert_names(info.value, "fusion", "IMAGE_EMBEDDING", "TEXT_EMBEDDING", "[2, 8]", "[2, 4]")


def test_third_modality_needs_no_code_change():
    rng = np.random.default_rng(13)
    embeddings = {m: rng.standard_normal((4, 5)) for m in ("IMAGE", "TEXT", "AUDIO")}
    valid = {
        "IMAGE": [True, False, True, False],
        "TEXT": [True, True, False, False],
        "AUDIO": [True, True, True, False],
    }
    handler = make_handler(modalities="image,text,audio", weights="1,1,2")
    assert {"AUDIO_EMBEDDING", "AUDIO_VALID", "AUDIO_STATUS"} <= {spec.name for spec in handler.inputs}
    out = handler(fusion_batch(embeddings, valid, {"AUDIO": [b"ok", b"ok", b"ok", b"missing"]}), ALL_OUTPUTS)
    mask = np.stack([valid[m] for m in ("IMAGE", "TEXT", "AUDIO")], axis=1)
    stacked = np.stack([embeddings[m] for m in ("IMAGE", "TEXT", "AUDIO")], axis=1).astype(np.float32)
    np.testing.assert_allclose(out["FUSED"], reference_late_fusion(stacked, mask, (1, 1, 2)), atol=1e-6)
    np.testing.assert_array_equal(out["MODALITY_MASK"], mask)
    assert statuses_of(out) == [["ok", "ok", "ok"], ["missing", "ok", "ok"], ["ok", "missing", "ok"],
                                ["missing", "missing", "missing"]]


def test_an_unknown_strategy_option_is_refused_when_parsed():
    from mmfuse.serving.errors import ConfigError
    from mmfuse.serving.fusion import FusionConfig
    from mmfuse.serving.params import Params

    params = Params("fusion", {"strategy": "early", "allow_random_init": "true",
                               "strategy_options": '{"embed_dim": 64, "hiden": 32}'})
    with pytest.raises(ConfigError, match=r"sets hiden, which strategy 'early' does not take; it takes: embed_dim, hidden"):
        FusionConfig.from_params(params)
    ok = Params("fusion", {"strategy": "early", "allow_random_init": "true",
                           "strategy_options": '{"embed_dim": 64, "hidden": 32}'})
    assert FusionConfig.from_params(ok).strategy == "early"
    # With a trained head the options are not used, so they are not checked against the strategy.
    with_head = Params("fusion", {"strategy": "attention", "head_dir": "/heads/attention",
                                  "strategy_options": '{"embed_dim": 64, "gate": "gmu"}'})
    assert FusionConfig.from_params(with_head).strategy == "attention"


# -- task outputs: classify --------------------------------------------------------------------------------------
CLASSIFY_OPTIONS = '{"embed_dim": 4, "hidden": 8, "task": "classify", "classes": ["bird", "cat", "dog"]}'


def test_a_classify_head_gives_probs_and_label():
    handler = make_handler(strategy="early", allow_random_init="true", strategy_options=CLASSIFY_OPTIONS)
    assert handler.task == "classify" and handler.optional_outputs == ("SCORE",)
    e = np.random.default_rng(0).standard_normal((4, 4)).astype(np.float32)
    batch = fusion_batch({"IMAGE": e, "TEXT": e[::-1]}, {"IMAGE": [True, False, True, False],
                                                        "TEXT": [True, True, False, False]})
    out = handler(batch, frozenset({"FUSED", "PROBS", "LABEL"}))
    probs, labels = out["PROBS"], [v.decode() for v in out["LABEL"][:, 0]]
    assert probs.shape == (4, 3) and np.allclose(probs.sum(axis=1), 1.0, atol=1e-6)
    assert labels[:3] == [["bird", "cat", "dog"][i] for i in probs[:3].argmax(axis=1)]
    np.testing.assert_allclose(probs[3], np.full(3, 1 / 3), atol=1e-6)  # nothing present: uniform
    assert labels[3] == ""  # and no label
    with pytest.raises(InvalidInputError, match="output SCORE requested but strategy 'early' has a classify head"):
        handler(batch, frozenset({"SCORE"}))


def test_a_match_head_refuses_probs_and_a_headless_strategy_refuses_every_task_output():
    match = make_handler(strategy="early", allow_random_init="true", strategy_options='{"embed_dim": 4}')
    assert match.task == "match" and match.optional_outputs == ("PROBS", "LABEL")
    headless = make_handler()
    assert headless.task is None and headless.optional_outputs == ("SCORE", "PROBS", "LABEL")
    e = np.ones((1, 4), np.float32)
    batch = fusion_batch({"IMAGE": e, "TEXT": e}, {"IMAGE": [True], "TEXT": [True]})
    with pytest.raises(InvalidInputError, match="output LABEL, PROBS requested but strategy 'early' has a match head"):
        match(batch, frozenset({"PROBS", "LABEL"}))
    with pytest.raises(InvalidInputError, match="has no task head"):
        headless(batch, frozenset({"PROBS"}))


def test_the_classes_parameter_must_name_the_heads_classes():
    ok = make_handler(strategy="early", allow_random_init="true", strategy_options=CLASSIFY_OPTIONS,
                      classes='["bird", "cat", "dog"]')
    assert ok.module.classes == ("bird", "cat", "dog")
    with pytest.raises(ConfigError, match="classes"):
        make_handler(strategy="early", allow_random_init="true", strategy_options=CLASSIFY_OPTIONS,
                     classes='["cat", "bird", "dog"]')
    with pytest.raises(ConfigError, match="JSON list of class names"):
        fusion_config(classes="cat,dog")
