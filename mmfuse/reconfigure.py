"""Live reconfiguration of a running tritonserver: diff, validate, apply, verify, roll back.

What ``mmfuse reconfigure`` does (any change of any model's config.pbtxt: a fusion
strategy or its parameters, encoder precision, batching, instance counts, the steps of
an ensemble):

1. **read** the desired configs from a repository folder (the edited config.pbtxt files),
   parsed with Triton's own ModelConfig proto, and what the server serves
   (repository index + model configs);
2. **diff** each model: the served config, restricted to the fields the file sets
   (Triton fills in defaults), against the file;
3. **validate offline**, before anything reaches the server: the config names its
   folder; an mmfuse model's parameters go through its handler's own parsing
   (the handler its ``handler`` parameter names, with ``Params.reject_unknown``), so unknown
   keys and bad values are refused with the handler's message; the handler's input
   tensors are declared; every ensemble touched by the change still fits its steps
   (tensors, data types, required inputs, batch sizes);
4. **apply** with Triton's explicit model control: ``load_model(name, config=JSON)``
   (a config override), composing models before the ensembles that use them;
5. **verify**: every model that was ready is ready, and a probe request through every
   ensemble that uses a changed model succeeds with finite outputs and every modality
   ``ok``;
6. **roll back** on any failure: the previous configs are loaded again (a model that
   was not loaded before is unloaded) and verified.

The server must run with ``--model-control-mode=explicit`` (``mmfuse serve
--model-control-mode explicit``). A config override lives in the server until it
restarts; the server then reads its repository, so keep the edited files there too.
"""
from __future__ import annotations

import difflib
import io
import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from google.protobuf import json_format, text_format
from google.protobuf.descriptor import FieldDescriptor
from tritonclient.grpc import model_config_pb2

from .repository import config_path, load_config
from .repository import models as repository_models
from .server import BACKEND_NAME
from .wire import decode_strings, infer_inputs

ModelConfig = model_config_pb2.ModelConfig

PROBE_TEXT = "mmfuse reconfigure probe: a red square on a white background"
PROBE_ROWS = 2


class ReconfigureError(RuntimeError):
    """Reconfiguration could not be done; nothing was changed, or it was rolled back."""


class ValidationFailed(ReconfigureError):
    def __init__(self, errors: Sequence[str]):
        super().__init__("invalid configuration, nothing was sent to the server:\n  " + "\n  ".join(errors))
        self.errors = list(errors)


def _print(message: str) -> None:
    print(message, flush=True)


# -- configs and diffs -----------------------------------------------------------------------------------------
def _is_map(fd: FieldDescriptor) -> bool:
    return fd.message_type is not None and fd.message_type.GetOptions().map_entry


def project(served, desired):
    """``served`` restricted to the fields ``desired`` sets (recursively): what a diff should compare.

    Triton fills in defaults (instance names, preferred batch sizes, optimization ...); those are not
    changes. Maps (``parameters``) and lists of different lengths are compared whole.
    """
    out = type(desired)()
    for fd, value in desired.ListFields():
        served_value = getattr(served, fd.name)
        target = getattr(out, fd.name)
        if _is_map(fd):
            for key in served_value:
                if fd.message_type.fields_by_name["value"].message_type is not None:
                    target[key].CopyFrom(served_value[key])
                else:
                    target[key] = served_value[key]
        elif fd.label == FieldDescriptor.LABEL_REPEATED:
            if fd.message_type is not None and len(served_value) == len(value):
                for s, d in zip(served_value, value):
                    target.add().CopyFrom(project(s, d))
            else:
                target.extend(served_value)
        elif fd.message_type is not None:
            if served.HasField(fd.name):
                target.CopyFrom(project(served_value, value))
            else:
                out.ClearField(fd.name)
        else:
            setattr(out, fd.name, served_value)
    return out


def config_text(config) -> str:
    return text_format.MessageToString(config)


def config_json(config) -> str:
    return json_format.MessageToJson(config, preserving_proto_field_name=True)


@dataclass
class ModelChange:
    name: str
    desired: ModelConfig
    served: ModelConfig | None  # None: the server has not loaded it
    source: Path  # the config.pbtxt read

    @property
    def projected(self) -> ModelConfig | None:
        return None if self.served is None else project(self.served, self.desired)

    @property
    def changed(self) -> bool:
        return self.served is None or self.projected != self.desired

    def diff(self) -> str:
        before = "" if self.served is None else config_text(self.projected)
        lines = difflib.unified_diff(
            before.splitlines(keepends=True), config_text(self.desired).splitlines(keepends=True),
            fromfile=f"{self.name} (served)" if self.served is not None else f"{self.name} (not loaded)",
            tofile=f"{self.name} ({self.source})",
        )
        return "".join(lines)


# -- offline validation -------------------------------------------------------------------------------------------
def _data_type(value: int) -> str:
    return model_config_pb2.DataType.Name(value)


def check_python_model(name: str, config: ModelConfig, model_dir: Path, load_weights: bool = False) -> list[str]:
    """Run the model's own parameter parsing offline (``Handler.parse``: no weights, no threads); return error
    messages (empty: valid). ``load_weights`` also builds the handler, as the server would."""
    from mmfuse.serving.errors import MMFuseError
    from mmfuse.serving.handler import check_config
    from mmfuse.serving.params import ModelContext, Params

    versions = [p for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit()] if model_dir.is_dir() else []
    if not versions:
        return [f"model '{name}': no version folder (e.g. 1/) in {model_dir}: Triton cannot load it; point "
                "--model-repository at the full repository"]
    kinds = [g.kind for g in config.instance_group]
    kind = "GPU" if model_config_pb2.ModelInstanceGroup.KIND_GPU in kinds else "CPU"
    context = ModelContext(model_name=name, model_dir=model_dir, instance_kind=kind,
                           version=ModelContext.latest_version(model_dir))
    params = Params.from_model_config(name, json.loads(config_json(config)))
    try:
        handler_class, parsed = check_config(context, params, [t.name for t in config.input],
                                             [t.name for t in config.output])
        if load_weights:
            handler_class.build(context, parsed).close()
    except MMFuseError as error:
        return [str(error)]
    except Exception as error:  # noqa: BLE001 - anything that would fail the load on the server
        return [f"model '{name}': its handler failed to parse its parameters: {type(error).__name__}: {error}"]
    return []


def validate_repository(repository: Path) -> list[str]:
    """Every model of a repository checked offline as a change is (the handlers' own parameter parsing
    without loading weights, Triton's ensemble rules, response-cache guards); empty when valid."""
    changes = [ModelChange(name, load_config(repository, name), None, config_path(repository, name))
               for name in repository_models(repository)]
    return validate(changes, {}, repository)


def check_ensemble(name: str, config: ModelConfig, configs: Mapping[str, ModelConfig]) -> list[str]:
    """Triton's own load-time rules for an ensemble, plus required inputs, against the given step configs."""
    errors = []
    who = f"ensemble '{name}'"
    tensors: dict[str, str] = {t.name: _data_type(t.data_type) for t in config.input}  # tensor -> dtype
    producers: dict[str, str] = {t: "its inputs" for t in tensors}
    consumed: set[str] = set()
    steps = list(config.ensemble_scheduling.step)
    if not steps:
        return [f"{who}: ensemble_scheduling has no step"]
    pending = steps
    # Steps in data-flow order: a step is ready when all its inputs exist.
    for _ in range(len(steps) + 1):
        waiting = []
        for step in pending:
            if all(v in tensors for v in step.input_map.values()):
                model = configs.get(step.model_name)
                if model is None:
                    errors.append(f"{who}: step model '{step.model_name}' is not in the repository")
                    continue
                inputs = {t.name: t for t in model.input}
                outputs = {t.name: t for t in model.output}
                for key, tensor in step.input_map.items():
                    consumed.add(tensor)
                    if key not in inputs:
                        errors.append(f"{who}: step '{step.model_name}' has no input '{key}' "
                                      f"(inputs: {', '.join(inputs)})")
                    elif _data_type(inputs[key].data_type) != tensors[tensor]:
                        errors.append(f"{who}: tensor '{tensor}' is {tensors[tensor]} but input '{key}' of "
                                      f"'{step.model_name}' is {_data_type(inputs[key].data_type)}")
                for key, spec in inputs.items():
                    if not spec.optional and key not in step.input_map:
                        errors.append(f"{who}: required input '{key}' of step '{step.model_name}' is not mapped")
                for key, tensor in step.output_map.items():
                    if key not in outputs:
                        errors.append(f"{who}: step '{step.model_name}' has no output '{key}' "
                                      f"(outputs: {', '.join(outputs)})")
                        continue
                    if tensor in producers:
                        errors.append(f"{who}: tensor '{tensor}' is produced twice ({producers[tensor]} and "
                                      f"'{step.model_name}')")
                    tensors[tensor] = _data_type(outputs[key].data_type)
                    producers[tensor] = f"'{step.model_name}'"
                if model.max_batch_size and config.max_batch_size > model.max_batch_size:
                    errors.append(f"{who}: max_batch_size {config.max_batch_size} exceeds step "
                                  f"'{step.model_name}' max_batch_size {model.max_batch_size}")
            else:
                waiting.append(step)
        if len(waiting) == len(pending):
            break
        pending = waiting
    for step in pending:
        missing = [v for v in step.input_map.values() if v not in tensors]
        errors.append(f"{who}: step '{step.model_name}' reads tensor(s) {', '.join(missing)} that nothing produces "
                      "(or the steps form a cycle)")
    for out in config.output:
        if out.name not in tensors:
            errors.append(f"{who}: output '{out.name}' is not produced by any step")
        elif tensors[out.name] != _data_type(out.data_type):
            errors.append(f"{who}: output '{out.name}' is {_data_type(out.data_type)} but step "
                          f"{producers[out.name]} produces {tensors[out.name]}")
        consumed.add(out.name)
    for t in config.input:
        if t.name not in consumed:
            errors.append(f"{who}: input '{t.name}' is not used by any step")
    for tensor, producer in producers.items():
        if producer != "its inputs" and tensor not in consumed:
            errors.append(f"{who}: tensor '{tensor}' produced by {producer} is not used by a later step nor an "
                          "output (Triton refuses unused ensemble tensors)")
    return errors


def ensemble_members(name: str, configs: Mapping[str, ModelConfig], _seen: frozenset = frozenset()) -> set[str]:
    """Every model an ensemble uses, nested ensembles included."""
    config = configs.get(name)
    if config is None or config.platform != "ensemble" or name in _seen:
        return set()
    members = set()
    for step in config.ensemble_scheduling.step:
        members.add(step.model_name)
        members |= ensemble_members(step.model_name, configs, _seen | {name})
    return members


def affected_ensembles(changed: Iterable[str], configs: Mapping[str, ModelConfig]) -> list[str]:
    changed = set(changed)
    return sorted(
        name for name, cfg in configs.items()
        if cfg.platform == "ensemble" and (name in changed or ensemble_members(name, configs) & changed)
    )


def validate(changes: Sequence[ModelChange], served: Mapping[str, ModelConfig], repository: Path,
             load_weights: bool = False) -> list[str]:
    """Every error that would make the change fail or break a served ensemble; empty when valid."""
    overlay = dict(served)
    overlay.update({c.name: c.desired for c in changes})
    errors = []
    for change in changes:
        cfg = change.desired
        if cfg.name and cfg.name != change.name:
            errors.append(f"model '{change.name}': config.pbtxt names '{cfg.name}'; it must match its folder")
        if cfg.platform == "ensemble":
            continue
        if not cfg.backend and not cfg.platform:
            errors.append(f"model '{change.name}': config.pbtxt sets neither backend nor platform")
        elif cfg.backend == BACKEND_NAME:
            errors += check_python_model(change.name, cfg, Path(repository) / change.name, load_weights)
    for ensemble in affected_ensembles([c.name for c in changes], overlay):
        errors += check_ensemble(ensemble, overlay[ensemble], overlay)
    changed = {c.name for c in changes}
    for name, cfg in overlay.items():
        if cfg.response_cache.enable and (name in changed or changed & set(affected_ensembles([name], overlay))):
            errors += check_response_cache(name, overlay)
    return sorted(set(errors), key=errors.index)


def check_response_cache(name: str, configs: Mapping[str, ModelConfig]) -> list[str]:
    """A cached model must be asked for the same outputs by every ensemble step that runs it.

    Triton keys a cached response by model, version and inputs, not by the outputs asked for (measured on
    2.51: text_encoder asked for EMBEDDING and SEQUENCE answered from the entry of a request for EMBEDDING
    alone, without SEQUENCE). A model whose ensembles ask for different outputs would hand one ensemble
    the other's subset.
    """
    asked = {}
    for ensemble, cfg in configs.items():
        if cfg.platform != "ensemble":
            continue
        for step in cfg.ensemble_scheduling.step:
            if step.model_name == name:
                asked[ensemble] = tuple(sorted(step.output_map))
    if len(set(asked.values())) <= 1:
        return []
    detail = "; ".join(f"{e} asks for {', '.join(o) or 'nothing'}" for e, o in sorted(asked.items()))
    return [f"model '{name}': response_cache is enabled but its ensembles ask it for different outputs ({detail}); "
            "Triton's cache key ignores the outputs asked for, so one ensemble would get another's cached subset. "
            "Enable the cache only on models every caller asks for the same outputs"]


# -- probes -------------------------------------------------------------------------------------------------------
def _probe_image() -> bytes:
    from PIL import Image

    image = Image.new("RGB", (96, 80), "white")
    image.paste((200, 30, 30), (20, 16, 70, 60))
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


_NUMPY = {"TYPE_FP32": np.float32, "TYPE_FP16": np.float16, "TYPE_FP64": np.float64, "TYPE_INT64": np.int64,
          "TYPE_INT32": np.int32, "TYPE_BOOL": np.bool_, "TYPE_UINT8": np.uint8}


def probe_inputs(config: ModelConfig, rows: int = PROBE_ROWS) -> dict[str, np.ndarray]:
    """Valid inputs for every modality of an ensemble: an image for *IMAGE*, a caption for other strings,
    seeded values for numeric tensors (variable dims: 1)."""
    rng = np.random.default_rng(0)
    arrays = {}
    for t in config.input:
        dtype = _data_type(t.data_type)
        dims = [d if d > 0 else 1 for d in t.dims]
        shape = ([rows] if config.max_batch_size > 0 else []) + dims
        if dtype == "TYPE_STRING":
            value = _probe_image() if "IMAGE" in t.name.upper() else PROBE_TEXT.encode()
            array = np.empty(shape, dtype=object)
            array.fill(value)
        elif dtype == "TYPE_BOOL":
            array = np.ones(shape, dtype=bool)
        elif dtype in _NUMPY:
            array = rng.standard_normal(shape).astype(_NUMPY[dtype])
        else:
            raise ReconfigureError(f"cannot build a probe input for {dtype} tensor '{t.name}'")
        arrays[t.name] = array
    return arrays


def run_probe(client, name: str, config: ModelConfig, timeout_s: float = 60.0) -> dict[str, np.ndarray]:
    """One request through an ensemble; raise ReconfigureError if it fails or its answer is not sound."""
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    inputs = infer_inputs(probe_inputs(config))
    outputs = [grpcclient.InferRequestedOutput(t.name) for t in config.output]
    try:
        result = client.infer(name, inputs, outputs=outputs, client_timeout=timeout_s)
    except InferenceServerException as error:
        raise ReconfigureError(f"probe of '{name}' failed: {error.message()}") from error
    answers = {t.name: result.as_numpy(t.name) for t in config.output}
    # Statuses first: they say why a row is not valid.
    for tensor, array in sorted(answers.items(), key=lambda item: not item[0].endswith("STATUS")):
        if array is None:
            raise ReconfigureError(f"probe of '{name}': output '{tensor}' is missing")
        if array.dtype.kind == "f" and not np.isfinite(array).all():
            raise ReconfigureError(f"probe of '{name}': output '{tensor}' is not finite")
        if tensor.endswith("STATUS"):
            statuses = {status for row in decode_strings(array) for status in row}
            if statuses != {"ok"}:
                raise ReconfigureError(f"probe of '{name}': valid probe inputs got {tensor} {sorted(statuses)}")
        if tensor == "VALID" and not array.all():
            raise ReconfigureError(f"probe of '{name}': valid probe inputs got VALID false")
    return answers


# -- the server side ----------------------------------------------------------------------------------------------
def served_state(client) -> dict[str, str]:
    """{model: state} from the repository index (READY, UNAVAILABLE, ...)."""
    index = client.get_model_repository_index(as_json=True)
    return {m["name"]: m.get("state", "") for m in index.get("models", [])}


def served_configs(client, names: Iterable[str]) -> dict[str, ModelConfig]:
    out = {}
    for name in names:
        out[name] = client.get_model_config(name).config
    return out


def cached_responses(client, changes: Sequence[ModelChange]) -> list[str]:
    """Changed models that hold responses in Triton's response cache, with why that blocks a live change.

    Triton 2.51 keys a cached response by model name, version and inputs, and keeps it across a reload
    (measured: text_encoder reloaded from fp32 to bf16 answered a repeated caption with its fp32 embedding,
    bit for bit, from the cache). A model has entries once its statistics count a cache miss (each miss
    inserts one); a server started without a cache never counts any.
    """
    out = []
    for change in changes:
        if change.served is None or not change.served.response_cache.enable:
            continue
        stats = client.get_inference_statistics(change.name, as_json=True).get("model_stats", [])
        misses = sum(int(m.get("inference_stats", {}).get("cache_miss", {}).get("count", 0)) for m in stats)
        if misses:
            out.append(f"model '{change.name}': its responses are in Triton's response cache ({misses} entries inserted); "
                       "Triton keeps them across a reload, so the reloaded model would answer repeated requests from its "
                       "old configuration. Restart the server with the new config (or publish it as a new version "
                       "folder, which the cache keys apart)")
    return out


@dataclass
class Plan:
    changes: list[ModelChange]  # changed models only, in apply order
    unchanged: list[str]
    not_loaded: list[str]  # in the repository folder, not loaded, not asked for
    served: dict[str, ModelConfig]
    ready: set[str]


def apply_order(changes: Sequence[ModelChange], configs: Mapping[str, ModelConfig]) -> list[ModelChange]:
    """Composing models first, then ensembles, an ensemble after any ensemble it uses."""
    def depth(name: str) -> int:
        cfg = configs.get(name)
        if cfg is None or cfg.platform != "ensemble":
            return 0
        return 1 + max((depth(s.model_name) for s in cfg.ensemble_scheduling.step), default=0)

    return sorted(changes, key=lambda c: (depth(c.name), c.name))


def plan(client, repository: Path, models: Sequence[str] = ()) -> Plan:
    repository = Path(repository)
    available = repository_models(repository)
    for name in models:
        if name not in available:
            raise ReconfigureError(f"model '{name}' has no {config_path(repository, name)}")
    state = served_state(client)
    ready = {n for n, s in state.items() if s == "READY"}
    served = served_configs(client, sorted(ready))
    wanted = list(models) or [n for n in available if n in ready]
    changes, unchanged = [], []
    for name in wanted:
        try:
            desired = load_config(repository, name)
        except ValueError as error:
            raise ValidationFailed([f"model '{name}': config.pbtxt does not parse with Triton's schema: {error}"]) \
                from error
        change = ModelChange(name, desired, served.get(name), config_path(repository, name))
        (changes if change.changed else unchanged).append(change if change.changed else name)
    overlay = dict(served)
    overlay.update({c.name: c.desired for c in changes})
    not_loaded = [n for n in available if n not in ready and n not in wanted]
    return Plan(apply_order(changes, overlay), unchanged, not_loaded, served, ready)


@dataclass
class Outcome:
    applied: list[str] = field(default_factory=list)
    rolled_back: bool = False
    probes_before: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    probes_after: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)


def _server_message(error: Exception) -> str:
    message = error.message() if hasattr(error, "message") and callable(error.message) else str(error)
    if "explicit model load" in message or "polling is enabled" in message or "not allowed" in message:
        message += " (start the server with --model-control-mode=explicit: `mmfuse serve --model-control-mode explicit`)"
    return message


def apply(client, the_plan: Plan, probe: bool = True, say: Callable[[str], None] = _print,
          timeout_s: float = 300.0) -> Outcome:
    """Load every change with a config override, verify, roll everything back on any failure."""
    from tritonclient.utils import InferenceServerException

    overlay = dict(the_plan.served)
    overlay.update({c.name: c.desired for c in the_plan.changes})
    changed = [c.name for c in the_plan.changes]
    probes = [e for e in affected_ensembles(changed, overlay)] if probe else []
    outcome = Outcome()
    for name in probes:
        if name in the_plan.ready:
            try:
                outcome.probes_before[name] = run_probe(client, name, the_plan.served[name])
            except ReconfigureError as error:
                say(f"note: before the change, {error}")
    previous = {c.name: (client.get_model_config(c.name, as_json=True)["config"] if c.served is not None else None)
                for c in the_plan.changes}
    try:
        for change in the_plan.changes:
            say(f"loading '{change.name}' with the new config ...")
            try:
                client.load_model(change.name, config=config_json(change.desired), client_timeout=timeout_s)
            except InferenceServerException as error:
                raise ReconfigureError(f"the server refused '{change.name}': {_server_message(error)}") from error
            outcome.applied.append(change.name)
        _verify(client, the_plan.ready | set(changed), probes, overlay, outcome, say)
    except ReconfigureError as error:
        say(f"FAILED: {error}")
        if outcome.applied:
            _rollback(client, the_plan, outcome, previous, say, timeout_s)
            outcome.rolled_back = True
        else:
            say("nothing was changed: the server keeps serving the previous configuration")
        raise
    return outcome


def _verify(client, expect_ready: set[str], probes: Sequence[str], configs: Mapping[str, ModelConfig],
            outcome: Outcome, say: Callable[[str], None]) -> None:
    state = served_state(client)
    lost = sorted(n for n in expect_ready if state.get(n) != "READY")
    if lost:
        raise ReconfigureError("not ready after the change: " + ", ".join(f"{n} ({state.get(n, 'absent')})" for n in lost))
    for name in probes:
        answers = run_probe(client, name, configs[name])
        outcome.probes_after[name] = answers
        before = outcome.probes_before.get(name)
        notes = []
        for tensor, array in answers.items():
            if before is not None and array.dtype.kind == "f" and tensor in before:
                old = before[tensor]
                delta = float(np.abs(array - old).max()) if old.shape == array.shape else float("inf")
                notes.append(f"{tensor} {'unchanged' if delta == 0 else f'changed (max |delta| {delta:.4g})'}")
        say(f"probe '{name}': ok" + (f"; {', '.join(notes)}" if notes else ""))


def _rollback(client, the_plan: Plan, outcome: Outcome, previous: Mapping[str, Any],
              say: Callable[[str], None], timeout_s: float) -> None:
    from tritonclient.utils import InferenceServerException

    say("rolling back ...")
    problems = []
    for name in reversed(outcome.applied):
        try:
            if previous[name] is None:
                client.unload_model(name, client_timeout=timeout_s)
            else:
                client.load_model(name, config=json.dumps(previous[name]), client_timeout=timeout_s)
        except InferenceServerException as error:
            problems.append(f"'{name}': {_server_message(error)}")
    state = served_state(client)
    lost = sorted(n for n in the_plan.ready if state.get(n) != "READY")
    if problems or lost:
        raise ReconfigureError("ROLLBACK INCOMPLETE: " + "; ".join(problems + [f"{n} not ready" for n in lost]))
    for name in outcome.probes_before:
        run_probe(client, name, the_plan.served[name])
    say("rolled back: the previous configuration serves again")
