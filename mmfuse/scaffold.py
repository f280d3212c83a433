"""``mmfuse init``: a complete, consistent model repository for any open_clip model.

The shipped repository is the template: its four open_clip models (image_preprocess, text_preprocess,
image_encoder, text_encoder), the fusion models and the public ensembles (embed_image, embed_text,
fuse_image_text, fuse_embeddings). What changes is data:

* the four open_clip models get the same ``model_name`` and ``pretrained`` (a tag, or a checkpoint file
  copied into the repository), so preprocessing, tokenizer and towers always agree;
* fusion is late fusion without a task head (no SCORE) unless a strategy is asked for;
* the serving profile (``mmfuse.profiles``) sets instances, batching, precision and decoding topology.

The result is validated offline with the handlers' own parsing (nothing is built, no weights are read)
before anything is left on disk.
"""
from __future__ import annotations

import shutil
from pathlib import Path

from .paths import shipped_repository

#: The models ``mmfuse init`` writes (the third-modality example is left out: its encoder is per-dataset).
INIT_MODELS = ("image_preprocess", "text_preprocess", "image_encoder", "text_encoder", "fusion", "fusion_pooled",
               "embed_image", "embed_text", "fuse_image_text", "fuse_embeddings")
FUSION_MODELS = ("fusion", "fusion_pooled")


class InitError(ValueError):
    """The repository cannot be written as asked (the message says why); nothing was left on disk."""


def _is_file_reference(model: str, pretrained: str) -> bool:
    from .serving.openclip_models import ClipSpec

    return ClipSpec(model, pretrained).is_checkpoint_file or Path(pretrained).is_file()


def _copy_template(source: Path, target: Path) -> None:
    for model in INIT_MODELS:
        shutil.copytree(source / model, target / model,
                        ignore=shutil.ignore_patterns("__pycache__", "*.safetensors", "fusion_head.*", "*.py"))
    for model in FUSION_MODELS:  # one empty version folder: the trained heads of the template are not copied
        for version in (target / model).iterdir():
            if version.is_dir() and version.name.isdigit() and version.name != "1":
                shutil.rmtree(version)
        (target / model / "1").mkdir(exist_ok=True)


def init_repository(target: Path, model: str, pretrained: str, profile: str = "auto", *, precision: str | None = None,
                    model_config: Path | None = None, cache_dir: str | None = None, strategy: str = "late",
                    allow_random_init: bool = False) -> Path:
    """Write the repository into ``target`` (new or empty) and validate it offline; return ``target``.

    ``pretrained``: an open_clip pretrained tag of ``model`` (resolved through ``cache_dir`` or the Hugging
    Face cache; downloaded by the server on first load where it has network) or a checkpoint file, which is
    copied into ``target/image_encoder/``. ``model_config``: a JSON open_clip model config for an
    architecture open_clip does not ship (copied too). ``strategy``: ``late`` (no head) or any strategy of
    ``mmfuse.serving.fusion`` with ``allow_random_init`` (untrained: tests and benchmarks only).
    """
    from .export import OPEN_CLIP_MODELS, export_encoders, set_fusion_head
    from .profiles import apply_profile, load_profile
    from .reconfigure import validate_repository
    from .repository import set_parameters, set_sequence_routing

    target = Path(target)
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise InitError(f"{target} exists and is not empty; choose a new folder")
    if not pretrained and not allow_random_init:
        raise InitError("no weights: give --pretrained TAG_OR_FILE (or --allow-random-init for tests and benchmarks)")
    profile_data = load_profile(profile, precision)
    created = not target.exists()
    try:
        target.mkdir(parents=True, exist_ok=True)
        _copy_template(shipped_repository(), target)
        values = {"model_name": model, "pretrained": pretrained}
        if pretrained and _is_file_reference(model, pretrained):
            checkpoint = Path(pretrained).expanduser()
            if not checkpoint.is_file():
                raise InitError(f"checkpoint file {checkpoint} does not exist")
            # Copied into the repository; the four models name it by the same relative path.
            values["pretrained"] = export_encoders(target, checkpoint, model)
        if model_config is not None:
            if not Path(model_config).is_file():
                raise InitError(f"model config file {model_config} does not exist")
            shutil.copy2(model_config, target / "image_encoder" / Path(model_config).name)
            values["model_config_file"] = f"../image_encoder/{Path(model_config).name}"
        if cache_dir:
            values["cache_dir"] = str(cache_dir)
        for name in OPEN_CLIP_MODELS:
            extra = {"allow_random_init": "true" if allow_random_init else "false"} if name.endswith("encoder") else {}
            set_parameters(target, name, {**values, **extra})
        fusion = {"strategy": strategy, "weights": "0.5,0.5", "normalize": "true", "head_dir": ""}
        if strategy != "late":
            fusion.update(allow_random_init="true", strategy_options=_embed_dim_options(target))
        set_parameters(target, "fusion", fusion)
        set_fusion_head(target, "fusion", strategy, "", has_head=False)
        # Only the token-level strategies read the encoders' sequences; routed, every row's last layer is shipped.
        set_sequence_routing(target, "fuse_image_text", "fusion", strategy in ("attention", "hybrid"))
        apply_profile(target, profile_data)
        errors = validate_repository(target)
        if errors:
            raise InitError("the repository does not validate:\n  " + "\n  ".join(errors))
    except BaseException:
        shutil.rmtree(target, ignore_errors=True) if created else _empty(target)
        raise
    return target


def _embed_dim_options(repository: Path) -> str:
    import json

    from .repository import load_config, parameters
    from .serving.openclip_models import ClipSpec
    from .serving.params import ModelContext, Params

    context = ModelContext("image_encoder", repository / "image_encoder")
    params = Params("image_encoder", parameters(load_config(repository, "image_encoder")))
    return json.dumps({"embed_dim": int(ClipSpec.from_params(params, context).model_config()["embed_dim"])})


def _empty(folder: Path) -> None:
    for child in folder.iterdir():
        shutil.rmtree(child) if child.is_dir() else child.unlink()
