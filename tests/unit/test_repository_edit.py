"""mmfuse.repository edits: routing the token sequences of an ensemble on and off."""
from __future__ import annotations

import shutil

import pytest

from mmfuse.repository import load_config, set_sequence_routing
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
