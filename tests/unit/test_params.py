"""mmfuse.serving.params: typed config.pbtxt parameters and the model context Triton passes."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from mmfuse.serving.errors import ConfigError
from mmfuse.serving.params import ModelContext, Params
from tests.unit.conftest import assert_names, make_params

MODEL = "fusion_test"


def params(**raw: str) -> Params:
    return make_params(MODEL, **raw)


# -- bool ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text", ["1", "true", "True", "YES", "on", " true "])
def test_bool_true_spellings(text):
    assert params(flag=text).bool("flag", False) is True


@pytest.mark.parametrize("text", ["0", "false", "FALSE", "no", "off"])
def test_bool_false_spellings(text):
    assert params(flag=text).bool("flag", True) is False


@pytest.mark.parametrize("default", [True, False])
def test_bool_absent_gives_default(default):
    assert params().bool("flag", default) is default


def test_bool_rejects_other_words():
    with pytest.raises(ConfigError) as info:
        params(normalize="maybe").bool("normalize", True)
    assert_names(info.value, MODEL, "normalize", "maybe")


# -- int -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text, value", [("42", 42), (" 7 ", 7), ("-3", -3), ("16_777_216", 16777216)])
def test_int_parses(text, value):
    assert params(n=text).int("n") == value


def test_int_absent_gives_default():
    assert params().int("n", 5, minimum=10) == 5  # a default is trusted, not range-checked


@pytest.mark.parametrize("text", ["4.5", "abc", "1e3", ""])
def test_int_rejects_non_integers(text):
    with pytest.raises(ConfigError) as info:
        params(max_image_bytes=text).int("max_image_bytes", 1)
    assert_names(info.value, MODEL, "max_image_bytes", repr(text), "integer")


@pytest.mark.parametrize("text, bound", [("0", ">= 1"), ("65", "<= 64")])
def test_int_range_checked(text, bound):
    with pytest.raises(ConfigError) as info:
        params(decode_threads=text).int("decode_threads", 2, minimum=1, maximum=64)
    assert_names(info.value, MODEL, "decode_threads", repr(text), bound)


@pytest.mark.parametrize("text", ["1", "64"])
def test_int_range_is_inclusive(text):
    assert params(decode_threads=text).int("decode_threads", 2, minimum=1, maximum=64) == int(text)


# -- float -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text, value", [("0.25", 0.25), ("1e-3", 1e-3), ("-2", -2.0)])
def test_float_parses(text, value):
    assert params(x=text).float("x") == value


def test_float_rejects_text():
    with pytest.raises(ConfigError) as info:
        params(temperature="warm").float("temperature", 1.0)
    assert_names(info.value, MODEL, "temperature", "'warm'", "number")


@pytest.mark.parametrize("text, bound", [("-0.5", ">= 0"), ("2.5", "<= 1")])
def test_float_range_checked(text, bound):
    with pytest.raises(ConfigError) as info:
        params(ratio=text).float("ratio", 0.5, minimum=0.0, maximum=1.0)
    assert_names(info.value, MODEL, "ratio", repr(text), bound)


def test_float_range_rejects_nan():
    with pytest.raises(ConfigError):
        params(ratio="nan").float("ratio", 0.5, minimum=0.0, maximum=1.0)


# -- choice ----------------------------------------------------------------------------------------------
def test_choice_accepts_listed_value():
    assert params(precision="bf16").choice("precision", "fp32", ("fp32", "bf16", "fp16")) == "bf16"
    assert params().choice("precision", "fp32", ("fp32", "bf16", "fp16")) == "fp32"


def test_choice_rejects_and_lists_choices():
    with pytest.raises(ConfigError) as info:
        params(precision="fp8").choice("precision", "fp32", ("fp32", "bf16", "fp16"))
    assert_names(info.value, MODEL, "precision", "'fp8'", "fp32, bf16, fp16")


# -- list / floats ---------------------------------------------------------------------------------------
def test_list_splits_and_strips():
    assert params(modalities=" image , text,audio ").list("modalities") == ("image", "text", "audio")


def test_list_absent_gives_default():
    assert params().list("modalities", ("image", "text")) == ("image", "text")


@pytest.mark.parametrize("text", ["", " , ,"])
def test_list_rejects_empty(text):
    with pytest.raises(ConfigError) as info:
        params(modalities=text).list("modalities", ("image",))
    assert_names(info.value, MODEL, "modalities", "comma-separated")


def test_floats_parse():
    assert params(weights="0.5, 1.5,2").floats("weights") == (0.5, 1.5, 2.0)


def test_floats_reject_non_numbers():
    with pytest.raises(ConfigError) as info:
        params(weights="0.5,heavy").floats("weights")
    assert_names(info.value, MODEL, "weights", "heavy", "numbers")


# -- required keys ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("getter", ["str", "int", "float", "list", "floats"])
def test_required_key_missing(getter):
    with pytest.raises(ConfigError) as info:
        getattr(params(other="1"), getter)("model_name")
    assert_names(info.value, MODEL, "model_name", "missing")


def test_present_required_key_is_returned_stripped():
    assert params(model_name="  ViT-B-32 ").str("model_name") == "ViT-B-32"


# -- reject_unknown --------------------------------------------------------------------------------------------
def test_reject_unknown_accepts_keys_that_were_read():
    p = params(strategy="late", weights="1,1", normalize="true")
    p.choice("strategy", "late", ("late",))
    p.floats("weights")
    p.bool("normalize", True)
    p.reject_unknown()


def test_reject_unknown_flags_a_misspelt_key():
    p = params(strategy="late", weigths="1,1")
    p.choice("strategy", "late", ("late",))
    p.floats("weights", (1.0, 1.0))  # the getter asks for the right spelling, the config has a typo
    with pytest.raises(ConfigError) as info:
        p.reject_unknown()
    assert_names(info.value, MODEL, "weigths")


def test_reject_unknown_accepts_triton_keys_and_also_known():
    p = params(EXECUTION_ENV_PATH="$$TRITON_MODEL_DIRECTORY/env.tar.gz", legacy="x")
    p.reject_unknown(also_known=("legacy",))


def test_reject_unknown_a_key_that_was_not_read():
    p = params(EXECUTION_ENV_PATH="env.tar.gz", seed="3")
    with pytest.raises(ConfigError) as info:
        p.reject_unknown()
    assert_names(info.value, MODEL, "seed")
    assert "EXECUTION_ENV_PATH" not in str(info.value).split(";")[0]


# -- from_model_config ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("as_json", [False, True])
def test_from_model_config_reads_string_values(as_json):
    config = {"name": "fusion",
              "parameters": {"weights": {"string_value": "0.5,0.5"}, "normalize": {"string_value": "false"}}}
    p = Params.from_model_config("fusion", json.dumps(config) if as_json else config)
    assert p.floats("weights") == (0.5, 0.5)
    assert p.bool("normalize", True) is False
    assert p.model_name == "fusion"


def test_from_model_config_without_parameters():
    p = Params.from_model_config("fusion", {"name": "fusion"})
    assert not p.has("weights")
    p.reject_unknown()


# -- ModelContext ----------------------------------------------------------------------------------------------
def test_context_from_model_dir(tmp_path):
    model_dir = tmp_path / "repo" / "image_encoder"
    ctx = ModelContext.from_triton_args({"model_name": "image_encoder", "model_repository": str(model_dir)})
    assert ctx.model_name == "image_encoder"
    assert ctx.model_dir == model_dir
    assert ctx.instance_kind == "CPU"
    assert ctx.torch_device == "cpu"


def test_context_from_repository_root(tmp_path):
    ctx = ModelContext.from_triton_args({"model_name": "fusion", "model_repository": str(tmp_path)})
    assert ctx.model_dir == tmp_path / "fusion"


def test_context_name_defaults_to_folder(tmp_path):
    ctx = ModelContext.from_triton_args({"model_repository": str(tmp_path / "text_encoder")})
    assert ctx.model_name == "text_encoder"
    assert ctx.model_dir == Path(tmp_path / "text_encoder")


@pytest.mark.parametrize("kind", ["GPU", "KIND_GPU", "gpu"])
def test_context_gpu_instance(kind, tmp_path):
    ctx = ModelContext.from_triton_args({
        "model_name": "image_encoder", "model_repository": str(tmp_path / "image_encoder"),
        "model_instance_kind": kind, "model_instance_device_id": "1",
    })
    assert (ctx.instance_kind, ctx.device_id, ctx.torch_device) == ("GPU", 1, "cuda:1")
