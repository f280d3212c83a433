"""open_clip models as configured by config.pbtxt parameters.

Parameters: ``CLIP_PARAMETERS`` below, which the handlers' ``parameters`` include (docs/configuration.md).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .errors import ConfigError, WeightsError
from .hardware import resolve_precision
from .params import ModelContext, Params

SHIPPED_CONFIG_DIR = Path(__file__).resolve().parent / "model_configs"

#: The parameters every open_clip model reads (the preprocessors only the first four).
CLIP_PARAMETERS = {
    "model_name": "open_clip architecture: ViT-B-32, ViT-L-14, ... or mmfuse-tiny / mmfuse-demo shipped here; the "
                  "four open_clip models of a repository must agree",
    "model_config_file": "a JSON open_clip model config to register, relative to the model folder; its optional "
                         "\"pretrained\" object names tags of that model: {\"TAG\": {\"hf_hub\": \"org/repo/\"}}",
    "pretrained": "weights: an open_clip pretrained tag (laion2b_s34b_b79k, openai, ...) or a checkpoint file "
                  "relative to the model folder (.safetensors; .pt/.pth/.bin loaded with weights_only=True)",
    "cache_dir": "where open_clip looks for (and downloads) a pretrained tag's weights; default the Hugging Face cache",
    "allow_random_init": "true: no weights is allowed and the model gets seeded random weights (tests, benchmarks); "
                         "false: no weights is a load error",
    "seed": "seed of the random init: same seed, same weights in every process",
    "precision": "compute precision of the tower: fp32, bf16 (CPUs with bf16 units, GPUs), fp16 (KIND_GPU only), "
                 "int8 (engine openvino: post-training quantisation, checked against fp32 at load), or auto: fp16 "
                 "on a KIND_GPU instance, bf16 on a CPU with bf16 units (AMX, AVX512-BF16), fp32 otherwise",
}
#: The ones the preprocessors read (they need the model's transform or tokenizer, not its weights).
PREPROCESS_CLIP_PARAMETERS = {k: CLIP_PARAMETERS[k] for k in ("model_name", "model_config_file", "pretrained",
                                                              "cache_dir")}
#: Parameters that parse for the tiny shipped architecture without weights (the generated docs' examples).
CLIP_DOC_EXAMPLE = {"model_name": "mmfuse-tiny", "pretrained": "", "allow_random_init": "true"}
PRECISIONS = ("fp32", "bf16", "fp16", "int8", "auto")
CHECKPOINT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")


def register_model_configs(extra: Path | None = None) -> None:
    """Make the shipped configs (and an optional user JSON config) known to open_clip."""
    import open_clip

    if not {"mmfuse-tiny", "mmfuse-demo"} <= set(open_clip.list_models()):
        open_clip.add_model_config(SHIPPED_CONFIG_DIR)
    if extra is not None:
        if not extra.is_file():
            raise ConfigError(f"model config file {extra} does not exist")
        open_clip.add_model_config(extra)
        _register_pretrained_tags(extra)


def _register_pretrained_tags(path: Path) -> None:
    """Tags a model config file names (its "pretrained" object) become open_clip pretrained tags of that model,
    resolved by open_clip itself (Hugging Face hub id, cache_dir, offline cache). open_clip keeps tags in its
    pretrained registry; the key is removed from the architecture config, which the model constructor reads."""
    import json

    from open_clip import factory, pretrained

    name = path.stem
    tags = json.loads(path.read_text()).get("pretrained")
    for config in factory._MODEL_CONFIGS.values():  # every add_model_config re-reads every file
        config.pop("pretrained", None)
    if not tags:
        return
    if not isinstance(tags, dict) or not all(isinstance(v, dict) and v.get("hf_hub") for v in tags.values()):
        raise ConfigError(f"model config file {path}: \"pretrained\" must map each tag to an object with \"hf_hub\"")
    registry = pretrained._PRETRAINED.setdefault(name, {})
    for tag, cfg in tags.items():
        registry[tag] = pretrained._pcfg(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in cfg.items()})


@dataclass(frozen=True)
class ClipSpec:
    """Which open_clip model, which weights, which precision."""

    model_name: str
    pretrained: str = ""
    allow_random_init: bool = False
    seed: int = 0
    precision: str = "fp32"
    cache_dir: str | None = None
    model_config_file: Path | None = None

    @classmethod
    def from_params(cls, params: Params, context: ModelContext | None = None, *, weights: bool = True) -> ClipSpec:
        base = context.model_dir if context is not None else Path.cwd()
        config_file = params.str("model_config_file", "")
        spec = cls(
            model_name=params.str("model_name"),
            model_config_file=_resolve(base, config_file) if config_file else None,
            pretrained=params.str("pretrained", ""),
            allow_random_init=params.bool("allow_random_init", False) if weights else True,
            seed=params.int("seed", 0, minimum=0) if weights else 0,
            precision=resolve_precision(params.choice("precision", "fp32", PRECISIONS),
                                        context.instance_kind if context is not None else "CPU") if weights else "fp32",
            cache_dir=params.str("cache_dir", "") or None,
        )
        if spec.is_checkpoint_file:
            spec = cls(**{**asdict(spec), "pretrained": str(_resolve(base, spec.pretrained))})
        spec.validate(context)
        return spec

    @property
    def is_checkpoint_file(self) -> bool:
        p = self.pretrained
        return bool(p) and ("/" in p or p.endswith(CHECKPOINT_SUFFIXES))

    def validate(self, context: ModelContext | None = None) -> None:
        import open_clip

        register_model_configs(self.model_config_file)
        who = f"model '{context.model_name}': " if context else ""
        if self.model_name not in open_clip.list_models():
            raise ConfigError(
                f"{who}unknown open_clip model_name {self.model_name!r}; "
                f"use one of open_clip.list_models() or set model_config_file"
            )
        if self.precision == "fp16" and (context is None or context.instance_kind != "GPU"):
            raise ConfigError(f"{who}precision 'fp16' needs a KIND_GPU instance; use fp32 or bf16 on the CPU")
        if self.precision == "int8" and context is not None and context.instance_kind == "GPU":
            raise ConfigError(f"{who}precision 'int8' runs on OpenVINO's CPU plugin (KIND_CPU); use fp16 on a GPU")
        if self.pretrained and not self.is_checkpoint_file:
            tags = open_clip.list_pretrained_tags_by_model(self.model_name)
            if self.pretrained not in tags:
                raise ConfigError(
                    f"{who}pretrained tag {self.pretrained!r} is not known for {self.model_name}; "
                    f"known tags: {', '.join(tags) or 'none'}; or give a checkpoint file path"
                )

    def model_config(self) -> dict[str, Any]:
        import open_clip

        register_model_configs(self.model_config_file)
        return open_clip.get_model_config(self.model_name)


def _resolve(base: Path, path: str) -> Path:
    p = Path(path).expanduser()
    return p if p.is_absolute() else (base / p).resolve()


def preprocess_config(spec: ClipSpec):
    """The PreprocessCfg that open_clip.create_model would attach to this model, without building it.

    Same precedence as open_clip: defaults < model config's preprocess_cfg < the pretrained tag's
    config < the vision tower's image size. The parity test checks this against open_clip itself.
    """
    import open_clip
    from open_clip.transform import PreprocessCfg, merge_preprocess_dict

    cfg = asdict(PreprocessCfg())
    model_cfg = spec.model_config()
    cfg = merge_preprocess_dict(cfg, model_cfg.get("preprocess_cfg", {}))
    if spec.pretrained and not spec.is_checkpoint_file:
        cfg = merge_preprocess_dict(cfg, open_clip.get_pretrained_cfg(spec.model_name, spec.pretrained))
    size = model_cfg.get("vision_cfg", {}).get("image_size")
    if size is not None:
        cfg["size"] = size
    return PreprocessCfg(**cfg)


def torch_dtype(precision: str):
    import torch

    # int8 towers are built in fp32 and quantised by OpenVINO (openvino_engine).
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "int8": torch.float32}[precision]


def load_clip(spec: ClipSpec, device: str = "cpu"):
    """Build the open_clip model with its weights, cast to the precision, in eval mode.

    Refuses to run with random weights unless ``allow_random_init`` says so.
    """
    import open_clip
    import torch

    register_model_configs(spec.model_config_file)
    if not spec.pretrained:
        if not spec.allow_random_init:
            raise WeightsError(
                f"no weights configured for open_clip model {spec.model_name!r}: set parameter 'pretrained' "
                "to a pretrained tag or a checkpoint file, or set 'allow_random_init' to 'true' "
                "(random weights: tests and benchmarks only)"
            )
        torch.manual_seed(spec.seed)
        model = open_clip.create_model(spec.model_name, pretrained=None, device="cpu")
    elif spec.is_checkpoint_file:
        path = Path(spec.pretrained)
        if not path.is_file():
            raise WeightsError(f"checkpoint file {path} for open_clip model {spec.model_name!r} does not exist")
        model = open_clip.create_model(spec.model_name, pretrained=None, device="cpu")
        try:
            # safetensors by suffix; anything else with torch.load(weights_only=True): never arbitrary pickles.
            open_clip.load_checkpoint(model, str(path), strict=True, weights_only=True)
        except Exception as error:  # noqa: BLE001
            raise WeightsError(f"could not load checkpoint {path} into {spec.model_name!r}: {error}") from error
    else:
        try:
            model = open_clip.create_model(
                spec.model_name, pretrained=spec.pretrained, cache_dir=spec.cache_dir, device="cpu",
                require_pretrained=True,
            )
        except Exception as error:  # noqa: BLE001
            raise WeightsError(
                f"could not load pretrained weights {spec.pretrained!r} for {spec.model_name!r} ({error}). "
                "Without network access, download the checkpoint elsewhere and set 'pretrained' to its path."
            ) from error
    model = model.to(device=device, dtype=torch_dtype(spec.precision))
    model.eval()
    model.requires_grad_(False)
    return model


def load_tokenizer(spec: ClipSpec):
    import open_clip

    register_model_configs(spec.model_config_file)
    try:
        return open_clip.get_tokenizer(spec.model_name, cache_dir=spec.cache_dir)
    except Exception as error:  # noqa: BLE001
        raise WeightsError(f"could not load the tokenizer of {spec.model_name!r}: {error}") from error
