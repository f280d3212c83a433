"""The server side of the evaluation: which trained heads exist, serving each one, scoring rows.

Strategies are switched on the running server by parameters only, as ``mmfuse reconfigure`` does:
``load_model("fusion", config=<served config with strategy / head_dir / classes changed>)`` and the
ensemble exposing the head's task outputs (``SCORE`` for a match head; ``PROBS`` and ``LABEL`` for a
classify head, whose class names become the fusion model's ``classes`` parameter), the other task's
outputs removed. This needs ``--model-control-mode=explicit``; the served configs are put back at the end.
"""
from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mmfuse.serving.strategies.base import HEAD_CONFIG
from mmfuse.wire import bytes_column

FUSION = "fusion"
ENSEMBLE = "fuse_image_text"
# The fusion model's task outputs (as mmfuse.export declares them): name -> (data type, dims per row).
TASK_OUTPUTS = {"SCORE": ("TYPE_FP32", (1,)), "PROBS": ("TYPE_FP32", (-1,)), "LABEL": ("TYPE_STRING", (1,))}
OUTPUTS_OF_TASK = {"match": ("SCORE",), "classify": ("PROBS", "LABEL")}


@dataclass(frozen=True)
class Head:
    """A trained fusion head on disk (``fusion_head.json`` + ``fusion_head.safetensors``)."""

    name: str  # unique label in the report: the training preset ("attention", "late-gmu", ...)
    strategy: str  # the fusion model's ``strategy`` parameter
    path: Path  # the folder holding the head
    source: str  # where it came from, for the report
    description: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def task(self) -> str:
        """``match`` or ``classify``: the record's top-level ``task`` (mmfuse train --data), else the hparams'."""
        return str(self.description.get("task") or self.description.get("hparams", {}).get("task") or "match")

    @property
    def classes(self) -> tuple[str, ...]:
        if self.task != "classify":
            return ()
        return tuple(str(c) for c in (self.description.get("classes")
                                      or self.description.get("hparams", {}).get("classes") or ()))

    @property
    def is_late_similarity(self) -> bool:
        h = self.description.get("hparams", {})
        return self.strategy == "late" and h.get("head") == "similarity" and h.get("gate", "fixed") == "fixed"


def preset_name(description: dict) -> str:
    preset = description.get("training", {}).get("config", {}).get("preset")
    if preset:
        return str(preset)
    h = description.get("hparams", {})
    name = description["strategy"]
    if name == "late" and h.get("gate") == "gmu":
        return "late-gmu"
    if name == "attention" and h.get("projector") == "llava":
        return "attention-llava"
    return name


def discover_heads(repository: Path | None, extra: Sequence[Path] = (), fusion_model: str = FUSION) -> list[Head]:
    """Every head in the repository's fusion version folders (oldest first), then the ``extra`` folders."""
    found: list[tuple[Path, str]] = []
    if repository is not None:
        model_dir = Path(repository) / fusion_model
        if model_dir.is_dir():
            for version in sorted((p for p in model_dir.iterdir() if p.name.isdigit()), key=lambda p: int(p.name)):
                if (version / HEAD_CONFIG).is_file():
                    found.append((version, f"{fusion_model}/{version.name}"))
    found += [(Path(p), str(p)) for p in extra]
    heads: list[Head] = []
    names: set[str] = set()
    for path, source in found:
        description = json.loads((path / HEAD_CONFIG).read_text())
        name = preset_name(description)
        if name in names:  # two heads of one preset: tell them apart by where they live
            name = f"{name} ({source})"
        names.add(name)
        heads.append(Head(name, description["strategy"], path.resolve(), source, description))
    return heads


class Switcher:
    """Serve one head after another on a running server; ``restore()`` puts the served configs back."""

    def __init__(self, client, repository: Path | None, say: Callable[[str], None] = print):
        from mmfuse.reconfigure import served_configs

        self.client = client
        self.repository = Path(repository) if repository is not None else None
        self.say = say
        self.original = served_configs(client, [FUSION, ENSEMBLE])
        self.changed = False

    def served_version_dir(self) -> Path | None:
        if self.repository is None:
            return None
        index = self.client.get_model_repository_index(as_json=True).get("models", [])
        versions = [int(m["version"]) for m in index if m["name"] == FUSION and m.get("state") == "READY"
                    and str(m.get("version", "")).isdigit()]
        if not versions:
            return None
        return self.repository / FUSION / str(max(versions))

    def head_dir_for(self, head: Head) -> str:
        """Relative to the served version folder when the head is in the same repository, else absolute."""
        served = self.served_version_dir()
        if served is not None and served.resolve().parent == head.path.parent:
            return os.path.relpath(head.path, served.resolve())
        return str(head.path)

    def served_head(self) -> str:
        """The served fusion strategy and head_dir, as text for the report."""
        params = {k: v.string_value for k, v in self.original[FUSION].parameters.items()}
        return f"strategy {params.get('strategy', 'late')!r}, head_dir {params.get('head_dir', '')!r}"

    def use(self, head: Head) -> None:
        from google.protobuf import json_format

        from mmfuse.reconfigure import config_json

        fusion = type(self.original[FUSION])()
        fusion.CopyFrom(self.original[FUSION])
        fusion.parameters["strategy"].string_value = head.strategy
        fusion.parameters["head_dir"].string_value = self.head_dir_for(head)
        if "allow_random_init" in fusion.parameters:
            fusion.parameters["allow_random_init"].string_value = "false"
        if head.classes or "classes" in fusion.parameters:
            fusion.parameters["classes"].string_value = json.dumps(list(head.classes)) if head.classes else ""
        wanted = OUTPUTS_OF_TASK[head.task]
        declared = {o.name for o in fusion.output}
        for name in wanted:
            if name not in declared:  # an older fusion config: declare the output the head gives
                data_type, dims = TASK_OUTPUTS[name]
                fusion.output.append(json_format.ParseDict({"name": name, "data_type": data_type, "dims": list(dims)},
                                                           type(fusion.output[0])()))
        self.changed = True
        self.client.load_model(FUSION, config=config_json(fusion))
        ensemble = task_ensemble(self.original[ENSEMBLE], fusion, head.task)
        self.client.load_model(ENSEMBLE, config=json_format.MessageToJson(ensemble))
        if not self.client.is_model_ready(ENSEMBLE):
            raise RuntimeError(f"{ENSEMBLE} is not ready after loading head {head.name}")

    def restore(self) -> None:
        from mmfuse.reconfigure import config_json

        if not self.changed:
            return
        self.client.load_model(FUSION, config=config_json(self.original[FUSION]))
        self.client.load_model(ENSEMBLE, config=config_json(self.original[ENSEMBLE]))
        self.changed = False


def task_ensemble(original, fusion, task: str):
    """A copy of the ensemble config that exposes exactly the task outputs of ``task`` from the fusion step."""
    ensemble = type(original)()
    ensemble.CopyFrom(original)
    wanted = OUTPUTS_OF_TASK[task]
    for step in ensemble.ensemble_scheduling.step:
        if step.model_name != FUSION:
            continue
        for name in TASK_OUTPUTS:
            if name in wanted:
                step.output_map[name] = name
            elif name in step.output_map and step.output_map[name] == name:
                del step.output_map[name]
    keep = [o for o in ensemble.output if o.name not in TASK_OUTPUTS or o.name in wanted]
    present = {o.name for o in keep}
    del ensemble.output[:]
    ensemble.output.extend(keep)
    for name in wanted:
        if name not in present:
            data_type = next((o.data_type for o in fusion.output if o.name == name), None)
            if data_type is None:
                from tritonclient.grpc import model_config_pb2

                data_type = model_config_pb2.DataType.Value(TASK_OUTPUTS[name][0])
            ensemble.output.add(name=name, data_type=data_type, dims=list(TASK_OUTPUTS[name][1]))
    return ensemble


def served_task(client, name: str = ENSEMBLE) -> str | None:
    """The served ensemble's task, by its outputs: classify (PROBS), match (SCORE) or None."""
    outputs = served_outputs(client, name)
    return "classify" if "PROBS" in outputs else "match" if "SCORE" in outputs else None


def served_outputs(client, name: str) -> list[str]:
    return [o.name for o in client.get_model_config(name).config.output]


def run_rows(client, options, ensemble: str, columns: dict[str, list], outputs: Sequence[str], batch: int,
             in_flight: int, progress: Callable[[int], None] | None = None) -> dict[str, np.ndarray]:
    """Send ``columns`` ([N] rows each) in requests of ``batch`` rows, ``in_flight`` at once; outputs in row order."""
    from mmfuse.clients._runtime import call

    n = len(next(iter(columns.values())))
    chunks = [slice(i, min(n, i + batch)) for i in range(0, n, batch)]

    def one(s: slice) -> dict[str, np.ndarray]:
        arrays = {k: (bytes_column(v[s]) if isinstance(v, list) else v[s]) for k, v in columns.items()}
        out = call(client, ensemble, arrays, outputs, options)
        if progress is not None:
            progress(s.stop - s.start)
        return out

    with ThreadPoolExecutor(max_workers=max(1, in_flight)) as pool:
        parts = list(pool.map(one, chunks))
    return {name: np.concatenate([p[name] for p in parts]) for name in outputs}


def describe_machine() -> dict[str, Any]:
    import platform

    from mmfuse import processes

    info: dict[str, Any] = {"machine": platform.machine(), "cpus": os.cpu_count(), "python": platform.python_version()}
    cpu, _ = processes.cpu_model_and_flags()
    memory = processes.memory_total_bytes()
    if cpu:
        info["cpu"] = cpu
    if memory:
        info["memory_gib"] = round(memory / 2**30, 1)
    info["load_average_at_start"] = processes.load_average()
    return info
