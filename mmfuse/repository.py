"""Read and edit a model repository's config.pbtxt files as Triton's own ModelConfig protos.

Parsing with Triton's proto (shipped in tritonclient) means a config that does not
parse here would not load in tritonserver either.
"""
from __future__ import annotations

import shutil
from collections.abc import Mapping
from pathlib import Path

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2


def config_path(repository: Path, model: str) -> Path:
    return Path(repository) / model / "config.pbtxt"


def load_config(repository: Path, model: str) -> model_config_pb2.ModelConfig:
    path = config_path(repository, model)
    config = model_config_pb2.ModelConfig()
    try:
        text_format.Parse(path.read_text(), config)
    except text_format.ParseError as error:
        raise ValueError(f"{path}: {error}") from error
    return config


def header_lines(path: Path) -> list[str]:
    """The comment lines heading a config.pbtxt (empty if the file does not exist)."""
    header = []
    if Path(path).exists():
        for line in Path(path).read_text().splitlines():
            if not line.startswith("#"):
                break
            header.append(line)
    return header


def save_config(repository: Path, model: str, config: model_config_pb2.ModelConfig) -> None:
    """Write config.pbtxt; the comment lines heading the old file are kept."""
    path = config_path(repository, model)
    header = header_lines(path)
    text = text_format.MessageToString(config)
    path.write_text("\n".join(header + [text]) if header else text)


def ensembles_using(repository: Path, model: str) -> list[str]:
    """Ensembles with a step that runs ``model``."""
    out = []
    for name in models(repository):
        config = load_config(repository, name)
        if config.platform == "ensemble" and any(s.model_name == model for s in config.ensemble_scheduling.step):
            out.append(name)
    return out


def set_output(repository: Path, ensemble: str, step_model: str, name: str, enabled: bool,
               data_type: str = "TYPE_FP32", dims: tuple[int, ...] = (1,)) -> None:
    """Expose (or stop exposing) a step's output ``name`` as an ensemble output of the same name."""
    config = load_config(repository, ensemble)
    outputs = [o for o in config.output if o.name != name]
    del config.output[:]
    config.output.extend(outputs)
    for step in config.ensemble_scheduling.step:
        if step.model_name == step_model:
            step.output_map.pop(name, None)
            if enabled:
                step.output_map[name] = name
    if enabled:
        config.output.add(name=name, data_type=model_config_pb2.DataType.Value(data_type), dims=list(dims))
    save_config(repository, ensemble, config)


SEQUENCE_TENSORS = ("SEQUENCE", "SEQUENCE_MASK")


def set_sequence_routing(repository: Path, ensemble: str, fusion_model: str, enabled: bool) -> list[str]:
    """Route (or stop routing) the encoders' token sequences into the fusion step of ``ensemble``.

    Only the strategies that read token sequences (attention, hybrid) need them. An encoder step with
    SEQUENCE mapped converts and ships its whole last layer (ViT-B-32: 50 x 768 floats per image, 77 x 512 per
    caption) for every row, which a late or early fusion step then ignores; without the mapping Triton does
    not ask for them and the encoder skips that work. Enabling maps ``<step>.SEQUENCE`` to the fusion input
    ``<MODALITY>_SEQUENCE`` (and the masks) for every encoder step whose EMBEDDING feeds
    ``<MODALITY>_EMBEDDING``, where the encoder has that output and the fusion model that input.
    Returns the fusion inputs changed.
    """
    config = load_config(repository, ensemble)
    steps = list(config.ensemble_scheduling.step)
    fusion = [s for s in steps if s.model_name == fusion_model]
    if len(fusion) != 1:
        raise ValueError(f"ensemble '{ensemble}' has {len(fusion)} steps running '{fusion_model}' (expected 1)")
    fusion = fusion[0]
    by_tensor = {value: key for key, value in fusion.input_map.items()}  # ensemble tensor -> fusion input
    accepts = {t.name for t in load_config(repository, fusion_model).input}
    changed = []
    for step in steps:
        embedding = step.output_map.get("EMBEDDING")
        target = by_tensor.get(embedding, "") if embedding else ""
        if step is fusion or not target.endswith("_EMBEDDING"):
            continue
        modality = target[: -len("_EMBEDDING")]
        produces = {t.name for t in load_config(repository, step.model_name).output}
        for name in SEQUENCE_TENSORS:
            fusion_input = f"{modality}_{name}"
            if name not in produces or fusion_input not in accepts:
                continue
            prefix = embedding[: -len("embedding")] if embedding.endswith("embedding") else f"{modality.lower()}_"
            tensor = step.output_map.get(name) or prefix + name.lower()
            if enabled and fusion_input not in fusion.input_map:
                step.output_map[name] = tensor
                fusion.input_map[fusion_input] = tensor
                changed.append(fusion_input)
            elif not enabled and fusion_input in fusion.input_map:
                fusion.input_map.pop(fusion_input)
                step.output_map.pop(name, None)
                changed.append(fusion_input)
    if changed:
        save_config(repository, ensemble, config)
    return changed


# Parameters of image_preprocess that a decoding image encoder (decode_images) takes over.
DECODING_PARAMETERS = ("max_image_bytes", "max_image_pixels", "decode_threads", "jpeg_draft")


def merge_image_decoding(repository: Path, preprocess: str = "image_preprocess",
                         encoder: str = "image_encoder") -> list[str]:
    """Let ``encoder`` decode the images itself (its ``decode_images`` parameter) and drop ``preprocess``.

    The encoder's config takes IMAGE (bytes) instead of PIXELS and VALID, answers VALID and STATUS too, and
    takes the preprocessing model's decoding parameters; every ensemble step pair preprocess -> encoder
    becomes one encoder step reading the pair's IMAGE and giving what the pair gave. The preprocessing
    model's folder is removed when no ensemble runs it any more. The ensembles' own inputs and outputs do
    not change. Returns the ensembles changed; refuses (ValueError, nothing written) an ensemble whose
    pixels go anywhere else than that encoder.
    """
    rewritten = {}
    for name in ensembles_using(repository, preprocess):
        config = load_config(repository, name)
        steps = list(config.ensemble_scheduling.step)
        for pre in [s for s in steps if s.model_name == preprocess]:
            pixels = pre.output_map.get("PIXELS")
            readers = [s for s in steps if pixels and pixels in s.input_map.values()]
            if len(readers) != 1 or readers[0].model_name != encoder or readers[0].input_map.get("PIXELS") != pixels:
                raise ValueError(f"ensemble '{name}': the pixels of '{preprocess}' do not go to '{encoder}' alone; "
                                 f"not merged")
            step = readers[0]
            if "VALID" in step.input_map and step.input_map["VALID"] != pre.output_map.get("VALID"):
                raise ValueError(f"ensemble '{name}': '{encoder}' reads a VALID that '{preprocess}' does not give")
            step.input_map.clear()
            step.input_map["IMAGE"] = pre.input_map["IMAGE"]
            for key in ("VALID", "STATUS"):
                if key in pre.output_map:
                    step.output_map[key] = pre.output_map[key]
            config.ensemble_scheduling.step.remove(pre)
        rewritten[name] = config
    if not rewritten:
        return []
    pre_config, config = load_config(repository, preprocess), load_config(repository, encoder)
    image = next(t for t in pre_config.input if t.name == "IMAGE")
    del config.input[:]
    config.input.add().CopyFrom(image)
    for output in pre_config.output:
        if output.name in ("VALID", "STATUS") and output.name not in {o.name for o in config.output}:
            config.output.add().CopyFrom(output)
    values = parameters(pre_config)
    for key in DECODING_PARAMETERS:
        if key in values and key not in config.parameters:
            config.parameters[key].string_value = values[key]
    config.parameters["decode_images"].string_value = "true"
    save_config(repository, encoder, config)
    for name, ensemble in rewritten.items():
        save_config(repository, name, ensemble)
    if not ensembles_using(repository, preprocess):
        shutil.rmtree(Path(repository) / preprocess)
    return sorted(rewritten)


def models(repository: Path) -> list[str]:
    return sorted(p.name for p in Path(repository).iterdir() if (p / "config.pbtxt").is_file())


def parameters(config: model_config_pb2.ModelConfig) -> dict[str, str]:
    return {key: value.string_value for key, value in config.parameters.items()}


_PARAMETER = r'(\{{\s*key:\s*"{key}"\s*,?\s*value:\s*\{{\s*string_value:\s*)"((?:[^"\\]|\\.)*)"'


def set_parameters(repository: Path, model: str, values: Mapping[str, str]) -> None:
    """Set ``parameters`` string values. Existing keys are edited in place, so the file's comments stay."""
    import json
    import re

    path = config_path(repository, model)
    text = path.read_text()
    missing = {}
    for key, value in values.items():
        pattern = re.compile(_PARAMETER.format(key=re.escape(key)))
        if len(pattern.findall(text)) == 1:
            text = pattern.sub(lambda m, value=value: m.group(1) + json.dumps(str(value)), text)
        else:
            missing[key] = value
    path.write_text(text)
    load_config(repository, model)  # still parses
    if missing:
        config = load_config(repository, model)
        for key, value in missing.items():
            config.parameters[key].string_value = str(value)
        save_config(repository, model, config)


def copy_repository(source: Path, target: Path) -> Path:
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__"))
    return target
