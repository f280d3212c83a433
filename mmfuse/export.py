"""Write trained weights into a model repository as configuration, never as code.

* encoders trained from scratch: one safetensors checkpoint in the image_encoder folder, and the
  four open_clip models' ``model_name`` / ``pretrained`` parameters pointing at it;
* a fusion head: a new version folder of the fusion model (the head's safetensors and JSON: no
  code), the fusion model's ``strategy`` / ``head_dir`` parameters, and SCORE
  exposed by the ensembles that run it (or removed, for a strategy without a task head).
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from mmfuse.serving.strategies import FusionStrategy, save_head

from .repository import ensembles_using, load_config, save_config, set_output, set_parameters

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


def set_fusion_head(repository: Path, fusion_model: str, strategy: str, head_dir: str, has_head: bool) -> None:
    """Select a strategy by parameters, and expose SCORE exactly where a task head exists."""
    config = load_config(repository, fusion_model)
    config.parameters["strategy"].string_value = strategy
    config.parameters["head_dir"].string_value = head_dir
    save_config(repository, fusion_model, config)
    for ensemble in ensembles_using(repository, fusion_model):
        set_output(repository, ensemble, fusion_model, "SCORE", has_head)


def export_head(repository: Path, fusion_model: str, head: FusionStrategy, record: dict[str, Any]) -> Path:
    """The head becomes version N+1 of the fusion model, which Triton then serves (latest version)."""
    model_dir = Path(repository) / fusion_model
    if not model_dir.is_dir():
        raise FileNotFoundError(f"{model_dir} is not a model folder of the repository")
    version_dir = model_dir / str(max(versions(model_dir), default=0) + 1)
    version_dir.mkdir()
    save_head(head, version_dir, extra=record)
    set_fusion_head(repository, fusion_model, head.name, ".", head.has_head)
    return version_dir
