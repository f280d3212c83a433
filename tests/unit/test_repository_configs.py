"""model_repository/: every config.pbtxt parses with Triton's schema and the pieces fit together."""
from __future__ import annotations

import ast
from functools import cache

import pytest

from mmfuse.serving import triton_model_path
from mmfuse.serving.handler import HANDLERS, resolve
from mmfuse.serving.params import Params
from tests.unit.conftest import MODEL_REPOSITORY, context_for, load_model_config, load_model_config_proto, model_names

OPEN_CLIP_MODELS = ("image_preprocess", "text_preprocess", "image_encoder", "text_encoder")
KIND_OF_TYPE = {"TYPE_STRING": "O", "TYPE_BOOL": "b", "TYPE_FP32": "f", "TYPE_INT64": "i"}


@cache
def config(name: str):
    return load_model_config_proto(name)


def is_ensemble(name: str) -> bool:
    return config(name).platform == "ensemble"


MODELS = model_names()
ENSEMBLES = [m for m in MODELS if is_ensemble(m)]
BACKEND_MODELS = [m for m in MODELS if not is_ensemble(m)]


def data_type(tensor) -> str:
    from tritonclient.grpc import model_config_pb2

    return model_config_pb2.DataType.Name(tensor.data_type)


def api(tensors) -> dict[str, tuple[str, list[int]]]:
    return {t.name: (data_type(t), list(t.dims)) for t in tensors}


def parameters(name: str) -> dict[str, str]:
    return {key: value.string_value for key, value in config(name).parameters.items()}


def test_repository_has_the_public_api_and_its_steps():
    assert set(PUBLIC_API) <= set(ENSEMBLES)
    assert set(OPEN_CLIP_MODELS) | {"fusion"} <= set(BACKEND_MODELS)


@pytest.mark.parametrize("name", MODELS)
def test_config_name_matches_folder(name):
    assert config(name).name == name
    assert (MODEL_REPOSITORY / name / "1").is_dir()


# -- scheduling ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", BACKEND_MODELS)
def test_backend_models_batch_dynamically_with_a_bounded_queue(name):
    cfg = config(name)
    assert cfg.backend == "mmfuse"
    assert cfg.max_batch_size > 0
    assert cfg.HasField("dynamic_batching")
    assert cfg.dynamic_batching.default_queue_policy.max_queue_size > 0


@pytest.mark.parametrize("name", ENSEMBLES)
def test_ensemble_batch_fits_every_step(name):
    cfg = config(name)
    assert cfg.max_batch_size > 0
    for step in cfg.ensemble_scheduling.step:
        assert cfg.max_batch_size <= config(step.model_name).max_batch_size, step.model_name


@pytest.mark.parametrize("name", ENSEMBLES)
def test_ensemble_steps_use_the_latest_version(name):
    for step in config(name).ensemble_scheduling.step:
        assert step.model_version == -1, step.model_name


# -- the public API ------------------------------------------------------------------------------------------
EMBED_OUTPUTS = {"EMBEDDING": ("TYPE_FP32", [-1]), "VALID": ("TYPE_BOOL", [1]), "STATUS": ("TYPE_STRING", [1])}
PUBLIC_API = {
    "embed_image": ({"IMAGE": ("TYPE_STRING", [1])}, EMBED_OUTPUTS),
    "embed_text": ({"TEXT": ("TYPE_STRING", [1])}, EMBED_OUTPUTS),
    "fuse_image_text": (
        {"IMAGE": ("TYPE_STRING", [1]), "TEXT": ("TYPE_STRING", [1])},
        {"FUSED": ("TYPE_FP32", [-1]), "MODALITY_MASK": ("TYPE_BOOL", [2]), "MODALITY_STATUS": ("TYPE_STRING", [2]),
         "SCORE": ("TYPE_FP32", [1])},  # the shipped fusion has a task head
    ),
}


@pytest.mark.parametrize("name", sorted(PUBLIC_API))
def test_public_api(name):
    inputs, outputs = PUBLIC_API[name]
    assert api(config(name).input) == inputs
    assert api(config(name).output) == outputs


# -- ensemble wiring -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ENSEMBLES)
def test_ensemble_tensor_flow(name):
    cfg = config(name)
    steps = list(cfg.ensemble_scheduling.step)
    outputs = {t.name for t in cfg.output}
    available = {t.name for t in cfg.input}
    produced = set()
    for i, step in enumerate(steps):
        for value in step.input_map.values():
            assert value in available, f"step {i} ({step.model_name}) reads {value!r} before it exists"
        for value in step.output_map.values():
            consumed_later = any(value in later.input_map.values() for later in steps[i + 1 :])
            assert consumed_later or value in outputs, f"{step.model_name} output {value!r} is never used"
            assert value not in produced, f"{value!r} is produced twice"
            produced.add(value)
        available |= set(step.output_map.values())
    assert outputs <= produced
    consumed = {v for step in steps for v in step.input_map.values()}
    assert {t.name for t in cfg.input} <= consumed


@pytest.mark.parametrize("name", ENSEMBLES)
def test_ensemble_maps_name_real_tensors_of_each_step(name):
    for step in config(name).ensemble_scheduling.step:
        composing = config(step.model_name)
        assert set(step.input_map) <= {t.name for t in composing.input}, step.model_name
        assert set(step.output_map) <= {t.name for t in composing.output}, step.model_name
        required = {t.name for t in composing.input if not t.optional}
        assert required <= set(step.input_map), f"{step.model_name} misses {required - set(step.input_map)}"


def test_open_clip_models_agree():
    settings = {name: (parameters(name)["model_name"], parameters(name).get("pretrained", ""))
                for name in OPEN_CLIP_MODELS}
    assert len(set(settings.values())) == 1, settings


# -- the python models ---------------------------------------------------------------------------------------
def handler_factory(name: str):
    """The handler class the model's config.pbtxt names (parameter ``handler``), built from its parameters."""
    return resolve(parameters(name)["handler"], name).from_parameters


@pytest.mark.parametrize("name", BACKEND_MODELS)
def test_every_python_model_names_a_shipped_handler_and_carries_no_code(name):
    assert parameters(name)["handler"] in HANDLERS
    assert not list((MODEL_REPOSITORY / name).rglob("*.py")), "handlers are bound by config.pbtxt, not by model.py"


def test_the_backend_model_py_is_a_thin_adapter():
    source = triton_model_path().read_text()
    assert len(source.splitlines()) <= 25
    tree = ast.parse(source)
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) for alias in node.names}
    assert "TritonAdapter" in imported
    [model] = [n for n in tree.body if isinstance(n, ast.ClassDef)]
    assert model.name == "TritonPythonModel"
    assert {f.name for f in model.body if isinstance(f, ast.FunctionDef)} == {"initialize", "execute", "finalize"}
    top_level = {type(n) for n in tree.body}
    assert top_level <= {ast.Expr, ast.Import, ast.ImportFrom, ast.ClassDef}, "no module-level state"


@pytest.mark.parametrize("name", BACKEND_MODELS)
def test_handler_accepts_its_config(open_clip_tiny, name):
    params = Params.from_model_config(name, load_model_config(name))
    handler = handler_factory(name)(context_for(name), params)
    try:
        params.reject_unknown()
        declared = {t.name: t for t in config(name).input}
        # Every declared input is one the handler reads; every required one is declared
        # (optional inputs a deployment does not use, e.g. token sequences for late fusion, may be left out).
        assert set(declared) <= {spec.name for spec in handler.inputs}
        assert {spec.name for spec in handler.inputs if not spec.optional} <= set(declared)
        for spec in handler.inputs:
            if spec.name not in declared:
                continue
            tensor = declared[spec.name]
            assert spec.optional == tensor.optional, spec.name
            assert KIND_OF_TYPE[data_type(tensor)] == spec.kind, spec.name
            if spec.row_rank is not None:
                assert len(tensor.dims) == spec.row_rank, spec.name
    finally:
        close = getattr(handler, "close", None)
        if close is not None:
            close()
