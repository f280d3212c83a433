"""Write trained weights into a model repository as configuration, never as code.

* encoders trained from scratch: one safetensors checkpoint in the image_encoder folder, and the
  four open_clip models' ``model_name`` / ``pretrained`` parameters pointing at it;
* a fusion head: a new version folder of the fusion model (the head's safetensors and JSON: no
  code), the fusion model's ``strategy`` / ``head_dir`` / ``classes`` parameters, and the ensembles that
  run it exposing the head's task outputs: SCORE (match) or PROBS + LABEL (classify), none without a head.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from mmfuse.serving.strategies import FusionStrategy, save_head

from .repository import ensembles_using, load_config, save_config, set_output, set_parameters

# The fusion model's task outputs: name -> (data type, dims per row), and which a head's task gives.
TASK_OUTPUTS = {"SCORE": ("TYPE_FP32", (1,)), "PROBS": ("TYPE_FP32", (-1,)), "LABEL": ("TYPE_STRING", (1,))}
OUTPUTS_OF_TASK = {"match": ("SCORE",), "classify": ("PROBS", "LABEL"), None: ()}

OPEN_CLIP_MODELS = ("image_preprocess", "text_preprocess", "image_encoder", "text_encoder")
ENCODERS = ("image_encoder", "text_encoder")


def versions(model_dir: Path) -> list[int]:
    return sorted(int(p.name) for p in Path(model_dir).iterdir() if p.is_dir() and p.name.isdigit())


def export_encoders(repository: Path, checkpoint: Path, model_name: str) -> str:
    """Copy the checkpoint into the repository and point the four open_clip models at it."""
    target = Path(repository) / "image_encoder" / checkpoint.name
    if checkpoint.resolve() != target.resolve():
        shutil.copy2(checkpoint, target)
    relative = f"../image_encoder/{checkpoint.name}"  # the same string works from every model folder
    for model in OPEN_CLIP_MODELS:
        values = {"model_name": model_name, "pretrained": relative}
        if model in ENCODERS:
            values["allow_random_init"] = "false"
        set_parameters(repository, model, values)
    return relative


def set_fusion_head(repository: Path, fusion_model: str, strategy: str, head_dir: str, has_head: bool,
                    task: str = "match", classes: tuple[str, ...] = ()) -> None:
    """Select a strategy by parameters, and expose the task outputs of its head exactly where one exists:
    SCORE for a match head, PROBS and LABEL for a classify head (whose class names become parameter
    ``classes``)."""
    from google.protobuf import json_format

    config = load_config(repository, fusion_model)
    config.parameters["strategy"].string_value = strategy
    config.parameters["head_dir"].string_value = head_dir
    if classes or "classes" in config.parameters:
        config.parameters["classes"].string_value = json.dumps(list(classes)) if classes else ""
    declared = {o.name for o in config.output}
    for name in OUTPUTS_OF_TASK[task if has_head else None]:
        if name not in declared:  # an older fusion config: declare the output the head gives
            data_type, dims = TASK_OUTPUTS[name]
            config.output.append(json_format.ParseDict({"name": name, "data_type": data_type, "dims": list(dims)},
                                                       type(config.output[0])()))
    save_config(repository, fusion_model, config)
    given = OUTPUTS_OF_TASK[task if has_head else None]
    for ensemble in ensembles_using(repository, fusion_model):
        for name, (data_type, dims) in TASK_OUTPUTS.items():
            if name == "PROBS" and classes:  # the public shape names the class count: [C]
                dims = (len(classes),)
            set_output(repository, ensemble, fusion_model, name, name in given, data_type, dims)


def export_head(repository: Path, fusion_model: str, head: FusionStrategy, record: dict[str, Any]) -> Path:
    """The head becomes version N+1 of the fusion model, which Triton then serves (latest version)."""
    model_dir = Path(repository) / fusion_model
    if not model_dir.is_dir():
        raise FileNotFoundError(f"{model_dir} is not a model folder of the repository")
    version_dir = model_dir / str(max(versions(model_dir), default=0) + 1)
    version_dir.mkdir()
    save_head(head, version_dir, extra=record)
    set_fusion_head(repository, fusion_model, head.name, ".", head.has_head, head.task, head.classes)
    return version_dir
