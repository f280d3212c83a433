"""Weights the tests write: a checkpoint file, and a Hugging Face hub cache in open_clip's own layout.

Nothing is downloaded: the hub cache is what ``huggingface_hub`` would have left after a download
(``models--ORG--REPO/refs/main`` naming a snapshot whose folder holds ``open_clip_model.safetensors``),
so that a pretrained *tag* resolves exactly as on a machine that once had network, with HF_HUB_OFFLINE=1.
"""
from __future__ import annotations

import json
from pathlib import Path

TINY = "mmfuse-tiny"
HUB_REPO = "mmfuse-tests/tiny-clip"
HUB_TAG = "tests"
HUB_REVISION = "0123456789abcdef0123456789abcdef01234567"


def tiny_state_dict(seed: int):
    import open_clip
    import torch

    from mmfuse.serving.openclip_models import register_model_configs

    register_model_configs()
    torch.manual_seed(seed)
    model = open_clip.create_model(TINY, pretrained=None)
    return {k: v.contiguous() for k, v in model.state_dict().items()}


def write_checkpoint(path: Path, seed: int = 7) -> Path:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tiny_state_dict(seed), str(path))
    return path


def write_hub_model(root: Path, seed: int = 11) -> tuple[Path, Path]:
    """(model config file naming the tag, hub cache dir) for an architecture ``hubtiny`` = mmfuse-tiny."""
    from safetensors.torch import save_file

    from mmfuse.serving.openclip_models import SHIPPED_CONFIG_DIR

    config = json.loads((SHIPPED_CONFIG_DIR / f"{TINY}.json").read_text())
    config["pretrained"] = {HUB_TAG: {"hf_hub": f"{HUB_REPO}/"}}
    config_file = root / "hubtiny.json"
    root.mkdir(parents=True, exist_ok=True)
    config_file.write_text(json.dumps(config, indent=2))
    cache = root / "hf-cache"
    repo = cache / ("models--" + HUB_REPO.replace("/", "--"))
    snapshot = repo / "snapshots" / HUB_REVISION
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(HUB_REVISION)
    save_file(tiny_state_dict(seed), str(snapshot / "open_clip_model.safetensors"))
    return config_file, cache
