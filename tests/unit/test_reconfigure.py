"""mmfuse.reconfigure without a server: diffs against Triton's auto-filled configs, offline validation,
apply order, probe inputs. The live path (load with a config override, probe, roll back) is tested on a real
tritonserver in tests/e2e/test_reconfigure.py."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from mmfuse import reconfigure as rc
from mmfuse.repository import copy_repository, load_config, models, save_config
from tests.paths import SHIPPED_REPOSITORY as REPO


@pytest.fixture(scope="module")
def shipped() -> dict[str, rc.ModelConfig]:
    return {name: load_config(REPO, name) for name in models(REPO)}


def autofilled(config: rc.ModelConfig) -> rc.ModelConfig:
    """What Triton serves for a config: the file plus defaults it fills in."""
    served = rc.ModelConfig()
    served.CopyFrom(config)
    served.version_policy.latest.num_versions = 1
    for i, group in enumerate(served.instance_group):
        group.name = f"{config.name}_{i}"
    if served.HasField("dynamic_batching"):
        served.dynamic_batching.preferred_batch_size.append(served.max_batch_size)
    if served.backend:
        served.default_model_filename = "model.py"
        served.optimization.input_pinned_memory.enable = True
    return served


def change(name: str, desired: rc.ModelConfig, served: rc.ModelConfig | None) -> rc.ModelChange:
    return rc.ModelChange(name, desired, served, REPO / name / "config.pbtxt")


# -- diff ---------------------------------------------------------------------------------------------------------
def test_defaults_filled_in_by_triton_are_not_changes(shipped):
    for name, config in shipped.items():
        c = change(name, config, autofilled(config))
        assert not c.changed, c.diff()
        assert c.diff() == ""


def test_a_parameter_edit_is_a_change_and_the_diff_shows_it(shipped):
    desired = load_config(REPO, "fusion")
    desired.parameters["weights"].string_value = "1,0"
    c = change("fusion", desired, autofilled(shipped["fusion"]))
    assert c.changed
    diff = c.diff()
    assert '-    string_value: "0.5,0.5"' in diff and '+    string_value: "1,0"' in diff
    changed_lines = [line for line in diff.splitlines() if line[:1] in "+-" and line[:3] not in ("+++", "---")]
    assert len(changed_lines) == 2, diff  # Triton's defaults (instance names, ...) do not show up


@pytest.mark.parametrize("edit, expected", [
    (lambda c: setattr(c.dynamic_batching, "max_queue_delay_microseconds", 100), "max_queue_delay_microseconds: 100"),
    (lambda c: setattr(c.instance_group[0], "count", 2), "count: 2"),
    (lambda c: c.parameters.pop("seed"), '-  key: "seed"'),
    (lambda c: c.parameters["precision"].MergeFrom(rc.model_config_pb2.ModelParameter(string_value="bf16")),
     'string_value: "bf16"'),
])
def test_batching_instances_and_parameter_removal_are_changes(shipped, edit, expected):
    desired = load_config(REPO, "image_encoder")
    edit(desired)
    c = change("image_encoder", desired, autofilled(shipped["image_encoder"]))
    assert c.changed and expected in c.diff()


def test_a_model_that_is_not_loaded_is_a_change(shipped):
    c = change("tabular_encoder", shipped["tabular_encoder"], None)
    assert c.changed and "(not loaded)" in c.diff()


# -- offline validation -----------------------------------------------------------------------------------------------
def validate_one(name: str, edit, shipped, repository: Path = REPO) -> list[str]:
    desired = load_config(repository, name)
    edit(desired)
    served = {n: autofilled(c) for n, c in shipped.items()}
    return rc.validate([change(name, desired, served[name])], served, repository)


def test_the_shipped_repository_is_valid(shipped):
    served = {n: autofilled(c) for n, c in shipped.items()}
    changes = [change(n, c, None) for n, c in shipped.items()]
    assert rc.validate(changes, served, REPO) == []


@pytest.mark.parametrize("model, edit, fragments", [
    ("fusion", lambda c: c.parameters["weights"].MergeFrom(rc.model_config_pb2.ModelParameter(string_value="1,0,1")),
     ["model 'fusion'", "'weights'", "3 values", "2 modalities"]),
    ("fusion", lambda c: c.parameters["wieghts"].MergeFrom(rc.model_config_pb2.ModelParameter(string_value="1,1")),
     ["model 'fusion'", "unknown parameter", "wieghts"]),
    ("fusion", lambda c: c.parameters["strategy"].MergeFrom(rc.model_config_pb2.ModelParameter(string_value="nope")),
     ["model 'fusion'", "'strategy'", "'nope'"]),
    ("image_encoder",
     lambda c: c.parameters["precision"].MergeFrom(rc.model_config_pb2.ModelParameter(string_value="fp8")),
     ["model 'image_encoder'", "'precision'", "'fp8'"]),
    ("image_encoder",
     lambda c: c.parameters["precision"].MergeFrom(rc.model_config_pb2.ModelParameter(string_value="fp16")),
     ["image_encoder", "fp16", "KIND_GPU"]),
    ("text_preprocess",
     lambda c: c.parameters["max_text_chars"].MergeFrom(rc.model_config_pb2.ModelParameter(string_value="0")),
     ["model 'text_preprocess'", "'max_text_chars'", "'0'"]),
    ("tabular_encoder",
     lambda c: c.parameters["feature_mean"].MergeFrom(rc.model_config_pb2.ModelParameter(string_value="1")),
     ["model 'tabular_encoder'", "'feature_mean'"]),
    ("fusion", lambda c: setattr(c, "name", "fusion2"), ["model 'fusion'", "'fusion2'", "folder"]),
])
def test_invalid_parameters_are_refused_offline_naming_model_key_and_value(shipped, model, edit, fragments):
    errors = validate_one(model, edit, shipped)
    assert errors, "must be refused"
    text = "\n".join(errors)
    for fragment in fragments:
        assert fragment in text


def test_a_modality_the_fusion_config_does_not_declare_is_refused(shipped):
    def three(c):
        c.parameters["strategy"].string_value = "late"  # (the shipped attention head is for two modalities)
        c.parameters["head_dir"].string_value = ""
        c.parameters["modalities"].string_value = "image,text,tabular"
        c.parameters["weights"].string_value = "1,1,1"

    errors = validate_one("fusion", three, shipped)
    assert any("TABULAR_EMBEDDING" in e and "does not declare" in e for e in errors), errors


def test_an_ensemble_that_no_longer_fits_its_fusion_step_is_refused(shipped):
    def drop_text(c):
        step = [s for s in c.ensemble_scheduling.step if s.model_name == "fusion"][0]
        del step.input_map["TEXT_EMBEDDING"]

    errors = validate_one("fuse_image_text", drop_text, shipped)
    assert any("required input 'TEXT_EMBEDDING' of step 'fusion'" in e for e in errors), errors
    assert any("'text_embedding'" in e and "not used" in e for e in errors), errors


def test_changing_a_composing_model_rechecks_the_ensembles_that_use_it(shipped):
    def rename_output(c):
        c.output[0].name = "FUSED_VECTOR"

    errors = validate_one("fusion", rename_output, shipped)
    assert any("ensemble 'fuse_image_text'" in e and "'FUSED'" in e for e in errors), errors


@pytest.mark.parametrize("edit, fragment", [
    (lambda c: setattr(c, "max_batch_size", 512), "max_batch_size 512 exceeds"),
    (lambda c: setattr(c.output[0], "data_type", rc.model_config_pb2.TYPE_FP16), "TYPE_FP16"),
    (lambda c: c.ensemble_scheduling.step[0].input_map.__setitem__("IMAGE", "nowhere"), "nowhere"),
    (lambda c: setattr(c.ensemble_scheduling.step[1], "model_name", "no_such_model"), "no_such_model"),
])
def test_ensemble_rules(shipped, edit, fragment):
    errors = validate_one("embed_image", edit, shipped)
    assert any(fragment in e for e in errors), errors


def test_a_python_model_without_a_version_folder_is_refused(shipped, tmp_path):
    repo = copy_repository(REPO, tmp_path / "repo")
    for version in [p for p in (repo / "fusion").iterdir() if p.is_dir() and p.name.isdigit()]:
        shutil.rmtree(version)
    errors = validate_one("fusion", lambda c: None, shipped, repo)
    assert any("model 'fusion'" in e and "version folder" in e for e in errors), errors


def test_a_model_that_names_no_handler_or_an_unknown_one_is_refused(shipped):
    errors = validate_one("fusion", lambda c: c.parameters.pop("handler"), shipped)
    assert any("model 'fusion'" in e and "names no handler" in e for e in errors), errors
    errors = validate_one("fusion", lambda c: c.parameters["handler"].__setattr__("string_value", "fusoin"), shipped)
    assert any("'fusoin' is not a handler" in e and "image_encoder" in e for e in errors), errors


def test_encoders_are_validated_without_loading_weights(shipped, monkeypatch):
    import mmfuse.serving.encoders as encoders

    def no_weights(*args, **kwargs):
        raise AssertionError("validation must not load weights")

    monkeypatch.setattr(encoders, "load_clip", no_weights)
    assert rc.check_python_model("image_encoder", shipped["image_encoder"], REPO / "image_encoder") == []
    assert rc.check_python_model("text_encoder", shipped["text_encoder"], REPO / "text_encoder") == []


# -- order, probes ------------------------------------------------------------------------------------------------------
def test_composing_models_are_applied_before_their_ensembles(shipped):
    names = ["fuse_image_text", "fusion", "embed_image", "image_encoder"]
    order = [c.name for c in rc.apply_order([change(n, shipped[n], None) for n in names], shipped)]
    assert order.index("fusion") < order.index("fuse_image_text")
    assert order.index("image_encoder") < order.index("embed_image")


def test_affected_ensembles(shipped):
    assert rc.affected_ensembles(["fusion"], shipped) == ["fuse_image_text"]
    assert rc.affected_ensembles(["image_encoder"], shipped) == [
        "embed_image", "fuse_image_text", "fuse_image_text_tabular"]
    assert rc.affected_ensembles(["tabular_encoder"], shipped) == ["fuse_image_text_tabular"]
    assert rc.affected_ensembles(["embed_text"], shipped) == ["embed_text"]


def test_probe_inputs_are_valid_for_every_modality(shipped):
    import io

    from PIL import Image

    arrays = rc.probe_inputs(shipped["fuse_image_text_tabular"])
    assert set(arrays) == {"IMAGE", "TEXT", "FEATURES"}
    assert arrays["FEATURES"].shape == (rc.PROBE_ROWS, 8) and arrays["FEATURES"].dtype == np.float32
    assert np.isfinite(arrays["FEATURES"]).all()
    Image.open(io.BytesIO(arrays["IMAGE"][0, 0])).verify()
    assert arrays["TEXT"][0, 0].decode().strip()


def test_an_unparsable_config_is_refused_before_the_server(tmp_path):
    repo = copy_repository(REPO, tmp_path / "repo")
    path = repo / "fusion" / "config.pbtxt"
    path.write_text(path.read_text().replace("max_batch_size: 256", "max_batch_size: lots"))

    class NoServer:
        def get_model_repository_index(self, as_json=False):
            return {"models": [{"name": "fusion", "state": "READY"}]}

        def get_model_config(self, name, as_json=False):
            return type("Response", (), {"config": autofilled(load_config(REPO, name))})()

    with pytest.raises(rc.ValidationFailed) as error:
        rc.plan(NoServer(), repo, ["fusion"])
    assert "model 'fusion'" in str(error.value) and "max_batch_size" in str(error.value)
    save_config(repo, "fusion", load_config(REPO, "fusion"))
    the_plan = rc.plan(NoServer(), repo, [])
    assert the_plan.changes == [] and the_plan.unchanged == ["fusion"]


# -- response cache -----------------------------------------------------------------------------------------------
def _enable_cache(c):
    c.response_cache.enable = True


def test_a_cache_on_a_model_its_ensembles_ask_different_outputs_of_is_refused(shipped):
    """embed_text asks text_encoder for EMBEDDING, fuse_image_text also for SEQUENCE: Triton's cache key
    ignores the outputs asked for, so one would get the other's cached subset."""
    errors = validate_one("text_encoder", _enable_cache, shipped)
    assert any("model 'text_encoder': response_cache is enabled" in e and "embed_text asks for EMBEDDING" in e
               and "fuse_image_text asks for EMBEDDING, SEQUENCE, SEQUENCE_MASK" in e for e in errors), errors


@pytest.mark.parametrize("name", ["text_preprocess", "fusion_pooled"])
def test_a_cache_on_a_model_every_caller_asks_the_same_outputs_of_is_valid(shipped, name):
    assert validate_one(name, _enable_cache, shipped) == []


def test_an_ensemble_change_rechecks_the_cached_models_it_runs(shipped):
    """A change to embed_image re-checks image_encoder, cached on the server: its callers disagree."""
    served = {n: autofilled(c) for n, c in shipped.items()}
    _enable_cache(served["image_encoder"])
    errors = rc.validate([change("embed_image", load_config(REPO, "embed_image"), None)], served, REPO)
    assert any("model 'image_encoder': response_cache is enabled" in e for e in errors), errors
    assert rc.validate([change("embed_image", load_config(REPO, "embed_image"), None)],
                       {n: autofilled(c) for n, c in shipped.items()}, REPO) == []


def test_an_unrelated_change_is_not_held_up_by_a_cached_model(shipped):
    served = {n: autofilled(c) for n, c in shipped.items()}
    _enable_cache(served["image_encoder"])  # its callers disagree, but nothing that runs it changes
    desired = load_config(REPO, "text_preprocess")
    assert rc.validate([change("text_preprocess", desired, served["text_preprocess"])], served, REPO) == []


class _Stats:
    def __init__(self, misses):
        self.misses = misses

    def get_inference_statistics(self, name, as_json=False):
        return {"model_stats": [{"name": name, "inference_stats": {"cache_miss": {"count": str(self.misses[name])}}}]}


def test_a_live_change_to_a_model_with_cached_responses_is_refused(shipped):
    served = autofilled(shipped["text_preprocess"])
    _enable_cache(served)
    desired = load_config(REPO, "text_preprocess")
    c = change("text_preprocess", desired, served)
    assert rc.cached_responses(_Stats({"text_preprocess": 0}), [c]) == []  # a server without a cache counts no misses
    refused = rc.cached_responses(_Stats({"text_preprocess": 3}), [c])
    assert len(refused) == 1 and "3 entries inserted" in refused[0] and "Restart the server" in refused[0]
    plain = change("text_preprocess", desired, autofilled(shipped["text_preprocess"]))
    assert rc.cached_responses(_Stats({"text_preprocess": 3}), [plain]) == []  # not cached: never refused


def test_the_openvino_engine_is_validated_offline(shipped):
    def openvino(c):
        c.parameters["engine"].string_value = "openvino"

    def openvino_on_gpu(c):
        openvino(c)
        c.instance_group[0].kind = rc.model_config_pb2.ModelInstanceGroup.KIND_GPU

    for encoder in ("image_encoder", "text_encoder"):
        assert validate_one(encoder, openvino, shipped) == []
        errors = validate_one(encoder, openvino_on_gpu, shipped)
        assert any(f"model '{encoder}': engine 'openvino' runs on a KIND_CPU instance" in e for e in errors), errors

    def unknown_engine(c):
        c.parameters["engine"].string_value = "tensorrt"

    errors = validate_one("text_encoder", unknown_engine, shipped)
    assert any("'engine' = 'tensorrt'" in e and "openvino" in e for e in errors), errors


def test_an_output_the_handler_never_writes_is_refused(shipped):
    from tritonclient.grpc import model_config_pb2

    errors = validate_one("text_preprocess", lambda c: c.output.add(
        name="PIXELS", data_type=model_config_pb2.TYPE_FP32, dims=[3, 64, 64]), shipped)
    assert any("declares output 'PIXELS'" in e and "text_preprocess never writes" in e for e in errors), errors
