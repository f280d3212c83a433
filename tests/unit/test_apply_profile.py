"""`mmfuse apply-profile`: a bench profile's settings on a copy of a repository, validated offline."""
from __future__ import annotations

import pytest

from mmfuse import bench
from mmfuse.cli import main
from mmfuse.repository import load_config, parameters
from tests.unit.conftest import MODEL_REPOSITORY


def test_cpu_profile_on_the_shipped_repository(tmp_path, capsys):
    out = tmp_path / "tuned"
    assert main(["apply-profile", "cpu", "--out", str(out)]) == 0
    assert "validated offline" in capsys.readouterr().out
    assert not (out / "image_preprocess").exists()  # folded into the encoder
    encoder = load_config(out, "image_encoder")
    tuning = bench.PROFILES["cpu"]["image_encoder"]
    assert encoder.instance_group[0].count == tuning.count
    assert list(encoder.dynamic_batching.preferred_batch_size) == list(tuning.preferred)
    values = parameters(encoder)
    assert values["decode_images"] == "true" and values["engine"] == "openvino" and values["precision"] == "auto"
    shipped = parameters(load_config(MODEL_REPOSITORY, "image_encoder"))
    # The models and weights stay the user's: only serving settings change.
    assert values["model_name"] == shipped["model_name"] and values["pretrained"] == shipped["pretrained"]
    assert (out / "image_encoder" / shipped["pretrained"]).is_file()
    fusion = load_config(out, "fuse_image_text")
    assert fusion.output == load_config(MODEL_REPOSITORY, "fuse_image_text").output
    step = next(s for s in fusion.ensemble_scheduling.step if s.model_name == "fusion")
    assert "IMAGE_SEQUENCE" in step.input_map  # the shipped attention head still gets its sequences


def test_separate_decoding_keeps_image_preprocess(tmp_path):
    out = tmp_path / "tuned"
    assert main(["apply-profile", "cpu", "--separate-decoding", "--out", str(out)]) == 0
    assert parameters(load_config(out, "image_preprocess"))["jpeg_draft"] == "true"
    assert "decode_images" not in parameters(load_config(out, "image_encoder"))


def test_an_invalid_result_is_refused_and_nothing_is_left(tmp_path, capsys):
    """The gpu profile on a repository whose encoder runs OpenVINO: OpenVINO refuses a KIND_GPU instance."""
    cpu = tmp_path / "cpu"
    assert main(["apply-profile", "cpu", "--out", str(cpu)]) == 0
    capsys.readouterr()
    out = tmp_path / "gpu"
    assert main(["apply-profile", "gpu", "--model-repository", str(cpu), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "openvino" in err and "KIND_CPU" in err and "nothing written" in err
    assert not out.exists()


@pytest.mark.parametrize("make", ["file", "non-empty"])
def test_an_existing_output_is_not_overwritten(tmp_path, capsys, make):
    out = tmp_path / "out"
    if make == "file":
        out.write_text("x")
    else:
        out.mkdir()
        (out / "keep").write_text("x")
    assert main(["apply-profile", "cpu", "--out", str(out)]) == 2
    assert "not empty" in capsys.readouterr().err


def test_a_folder_without_models_is_refused(tmp_path, capsys):
    (tmp_path / "src").mkdir()
    assert main(["apply-profile", "cpu", "--model-repository", str(tmp_path / "src"), "--out",
                 str(tmp_path / "out")]) == 2
    assert "not a model repository" in capsys.readouterr().err
