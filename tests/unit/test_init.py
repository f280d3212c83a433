"""`mmfuse init`: a complete repository for any open_clip model, from a pretrained tag or a checkpoint file.

The tag is resolved by open_clip itself from a Hugging Face cache the test writes (open_clip's hub layout,
random weights, HF_HUB_OFFLINE=1): the path a user's machine takes after a first download.
"""
from __future__ import annotations

import pytest

from mmfuse.auto import resolve
from mmfuse.cli import main
from mmfuse.codegen import sync
from mmfuse.reconfigure import validate_repository
from mmfuse.repository import load_config, models, parameters
from tests.hub import HUB_TAG, TINY, tiny_state_dict, write_checkpoint, write_hub_model

OPEN_CLIP_MODELS = ("image_preprocess", "text_preprocess", "image_encoder", "text_encoder")


def test_a_pretrained_tag_loads_offline_from_the_hub_cache(tmp_path, monkeypatch):
    import torch

    from mmfuse.serving.openclip_models import ClipSpec, load_clip
    from mmfuse.serving.params import ModelContext, Params

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    config_file, cache = write_hub_model(tmp_path)
    params = Params("image_encoder", {"model_name": "hubtiny", "model_config_file": str(config_file),
                                      "pretrained": HUB_TAG, "cache_dir": str(cache)})
    spec = ClipSpec.from_params(params, ModelContext("image_encoder", tmp_path))
    assert not spec.is_checkpoint_file
    model = load_clip(spec)
    expected = tiny_state_dict(11)
    for key, value in model.state_dict().items():
        assert torch.equal(value, expected[key]), key
    # A tag the config does not name is refused offline, before any weights are looked for.
    with pytest.raises(Exception, match="not known"):
        ClipSpec.from_params(Params("image_encoder", {**params._raw, "pretrained": "nope"}),
                             ModelContext("image_encoder", tmp_path))


def _agree(repository) -> set[tuple[str, str]]:
    return {(parameters(load_config(repository, m))["model_name"], parameters(load_config(repository, m))["pretrained"])
            for m in OPEN_CLIP_MODELS if m in models(repository)}


def test_init_from_a_checkpoint_file(tmp_path, capsys):
    checkpoint = write_checkpoint(tmp_path / "weights" / "tiny.safetensors")
    repo = tmp_path / "repo"
    assert main(["init", str(repo), "--model", TINY, "--pretrained", str(checkpoint)]) == 0
    printed = capsys.readouterr().out
    assert "validated offline" in printed and "profile 'auto'" in printed
    choice = resolve("auto")  # the default: chosen for this machine, and said so
    assert f"hardware: {choice.hardware.hardware_class}" in printed
    merged = choice.profile.decoding == "in_encoder"  # decoding folded into the image encoder
    assert sorted(models(repo)) == sorted(["text_preprocess", "image_encoder", "text_encoder",
                                           "fusion", "fusion_pooled", "embed_image", "embed_text", "fuse_image_text",
                                           "fuse_embeddings"] + ([] if merged else ["image_preprocess"]))
    encoder = parameters(load_config(repo, "image_encoder"))
    assert encoder["precision"] == choice.profile.models["image_encoder"].params["precision"]
    # The four open_clip models agree on model and weights; the checkpoint travels with the repository.
    assert _agree(repo) == {(TINY, "../image_encoder/tiny.safetensors")}
    assert (repo / "image_encoder" / "tiny.safetensors").read_bytes() == checkpoint.read_bytes()
    # Late fusion without a head: no SCORE anywhere, no trained version folders, no code.
    fusion = parameters(load_config(repo, "fusion"))
    assert fusion["strategy"] == "late" and fusion["head_dir"] == ""
    assert "SCORE" not in [o.name for o in load_config(repo, "fuse_image_text").output]
    assert [p.name for p in (repo / "fusion").iterdir() if p.is_dir()] == ["1"]
    assert not list(repo.rglob("*.py")) and not list(repo.rglob("fusion_head.*"))
    assert validate_repository(repo) == []
    # Its clients are generated beside it, and are up to date.
    clients = tmp_path / "repo_clients"
    assert (clients / "fuse_image_text.py").is_file() and (clients / "__init__.py").is_file()
    assert not sync(repo, clients, check=True).stale


def test_init_from_a_tag_with_the_cpu_profile(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    config_file, cache = write_hub_model(tmp_path / "hub")
    repo = tmp_path / "repo"
    assert main(["init", str(repo), "--model", "hubtiny", "--pretrained", HUB_TAG, "--model-config", str(config_file),
                 "--cache-dir", str(cache), "--profile", "cpu", "--clients-out", str(tmp_path / "c")]) == 0
    assert _agree(repo) == {("hubtiny", HUB_TAG)}
    assert not (repo / "image_preprocess").exists()  # the cpu profile decodes inside the image encoder
    encoder = parameters(load_config(repo, "image_encoder"))
    assert encoder["decode_images"] == "true" and encoder["cache_dir"] == str(cache)
    assert encoder["model_config_file"] == "../image_encoder/hubtiny.json"


@pytest.mark.parametrize("args, message", [
    (["--model", "no-such-model", "--pretrained", "openai"], "unknown open_clip model_name"),
    (["--model", TINY, "--pretrained", "no_such_tag"], "not known"),
    (["--model", TINY, "--pretrained", "/no/such/file.safetensors"], "does not exist"),
    (["--model", TINY], "no weights"),
])
def test_init_refuses_what_would_not_serve_and_leaves_nothing(tmp_path, capsys, args, message):
    repo = tmp_path / "repo"
    assert main(["init", str(repo), *args]) == 2
    assert message in capsys.readouterr().err
    assert not repo.exists()


def test_init_refuses_a_folder_that_is_not_empty(tmp_path, capsys):
    (tmp_path / "repo").mkdir()
    (tmp_path / "repo" / "keep").write_text("mine")
    assert main(["init", str(tmp_path / "repo"), "--model", TINY, "--allow-random-init"]) == 2
    assert "not empty" in capsys.readouterr().err
    assert (tmp_path / "repo" / "keep").read_text() == "mine"
