"""mmfuse.repository edits: routing the token sequences of an ensemble on and off; merging image decoding."""
from __future__ import annotations

import shutil

import pytest
from tritonclient.grpc import model_config_pb2

from mmfuse.repository import load_config, merge_image_decoding, parameters, set_sequence_routing
from tests.unit.conftest import MODEL_REPOSITORY, model_names


def maps(repo, ensemble):
    return [(s.model_name, dict(s.input_map), dict(s.output_map))
            for s in load_config(repo, ensemble).ensemble_scheduling.step]


def sequence_inputs(repo, ensemble, fusion="fusion"):
    step = next(s for s in load_config(repo, ensemble).ensemble_scheduling.step if s.model_name == fusion)
    return sorted(k for k in step.input_map if "SEQUENCE" in k)


@pytest.fixture
def repo(tmp_path):
    target = tmp_path / "repo"
    for name in model_names():
        shutil.copytree(MODEL_REPOSITORY / name, target / name, ignore=shutil.ignore_patterns("*.safetensors", "1", "2"))
    return target


ALL = ["IMAGE_SEQUENCE", "IMAGE_SEQUENCE_MASK", "TEXT_SEQUENCE", "TEXT_SEQUENCE_MASK"]


def test_sequences_off_and_back_on(repo):
    shipped = maps(repo, "fuse_image_text")
    assert sequence_inputs(repo, "fuse_image_text") == ALL  # the shipped attention head reads them
    assert sorted(set_sequence_routing(repo, "fuse_image_text", "fusion", False)) == ALL
    assert sequence_inputs(repo, "fuse_image_text") == []
    for model, _, outputs in maps(repo, "fuse_image_text"):
        assert "SEQUENCE" not in outputs and "SEQUENCE_MASK" not in outputs, model  # Triton then never asks for them
    assert set_sequence_routing(repo, "fuse_image_text", "fusion", False) == []  # idempotent
    assert sorted(set_sequence_routing(repo, "fuse_image_text", "fusion", True)) == ALL
    assert maps(repo, "fuse_image_text") == shipped  # the same tensors under the same names
    assert set_sequence_routing(repo, "fuse_image_text", "fusion", True) == []


def test_only_inputs_the_fusion_model_has_are_routed(repo):
    """fusion_image_text_tabular (late fusion) declares no sequence inputs: nothing is routed, the config is as shipped."""
    shipped = (repo / "fuse_image_text_tabular" / "config.pbtxt").read_text()
    assert set_sequence_routing(repo, "fuse_image_text_tabular", "fusion_image_text_tabular", True) == []
    assert set_sequence_routing(repo, "fuse_image_text_tabular", "fusion_image_text_tabular", False) == []
    assert (repo / "fuse_image_text_tabular" / "config.pbtxt").read_text() == shipped  # not rewritten


def test_an_ensemble_without_that_fusion_step_is_refused(repo):
    with pytest.raises(ValueError, match="expected 1"):
        set_sequence_routing(repo, "embed_image", "fusion", False)


IMAGE_ENSEMBLES = ["embed_image", "fuse_image_text", "fuse_image_text_tabular"]


def test_merged_image_decoding_keeps_every_ensemble_tensor(repo):
    """One image_encoder step per pair; the ensembles read and give the same tensors as before."""
    before = {name: load_config(repo, name) for name in IMAGE_ENSEMBLES}
    assert merge_image_decoding(repo) == IMAGE_ENSEMBLES
    assert not (repo / "image_preprocess").exists()  # nothing runs it any more
    for name in IMAGE_ENSEMBLES:
        after = load_config(repo, name)
        assert list(after.input) == list(before[name].input) and list(after.output) == list(before[name].output)
        steps = {s.model_name: s for s in after.ensemble_scheduling.step}
        assert "image_preprocess" not in steps
        old = {s.model_name: s for s in before[name].ensemble_scheduling.step}
        encoder = steps["image_encoder"]
        assert dict(encoder.input_map) == {"IMAGE": old["image_preprocess"].input_map["IMAGE"]}
        expected = dict(old["image_encoder"].output_map)
        expected.update({k: v for k, v in old["image_preprocess"].output_map.items() if k != "PIXELS"})
        assert dict(encoder.output_map) == expected
        produced = {v for s in after.ensemble_scheduling.step for v in s.output_map.values()} | {
            t.name for t in after.input}
        for step in after.ensemble_scheduling.step:  # every tensor a step reads is still produced
            assert set(step.input_map.values()) <= produced, (name, step.model_name)
    config = load_config(repo, "image_encoder")
    assert [(t.name, t.data_type) for t in config.input] == [("IMAGE", model_config_pb2.TYPE_STRING)]
    assert {"EMBEDDING", "VALID", "STATUS"} <= {t.name for t in config.output}
    values = parameters(config)
    assert values["decode_images"] == "true" and values["max_image_bytes"] == "16777216"
    assert merge_image_decoding(repo) == []  # idempotent


def test_pixels_read_by_another_step_are_not_merged(repo):
    from mmfuse.repository import save_config

    config = load_config(repo, "embed_image")
    step = config.ensemble_scheduling.step.add(model_name="fusion_pooled", model_version=-1)
    step.input_map["IMAGE_EMBEDDING"] = "pixels"
    save_config(repo, "embed_image", config)
    shipped = {name: (repo / name / "config.pbtxt").read_text() for name in ("image_encoder", "fuse_image_text")}
    with pytest.raises(ValueError, match="embed_image"):
        merge_image_decoding(repo)
    assert (repo / "image_preprocess").exists()
    assert {name: (repo / name / "config.pbtxt").read_text() for name in shipped} == shipped  # nothing written


def test_a_classify_head_exposes_probs_and_label_and_a_match_head_score(repo):
    import json

    from mmfuse.export import set_fusion_head

    def outputs(name):
        return {o.name: (model_config_pb2.DataType.Name(o.data_type), list(o.dims)) for o in load_config(repo, name).output}

    set_fusion_head(repo, "fusion", "early", ".", True, "classify", ("bird", "cat"))
    ensemble = outputs("fuse_image_text")
    assert ensemble["PROBS"] == ("TYPE_FP32", [2]) and ensemble["LABEL"] == ("TYPE_STRING", [1])
    assert "SCORE" not in ensemble
    assert json.loads(parameters(load_config(repo, "fusion"))["classes"]) == ["bird", "cat"]
    set_fusion_head(repo, "fusion", "attention", ".", True, "match")
    ensemble = outputs("fuse_image_text")
    assert "SCORE" in ensemble and "PROBS" not in ensemble and "LABEL" not in ensemble
    assert parameters(load_config(repo, "fusion"))["classes"] == ""
    set_fusion_head(repo, "fusion", "late", "", False)
    assert not {"SCORE", "PROBS", "LABEL"} & set(outputs("fuse_image_text"))
