"""Read and edit a model repository's config.pbtxt files as Triton's own ModelConfig protos.

Parsing with Triton's proto (shipped in tritonclient) means a config that does not
parse here would not load in tritonserver either.
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Mapping

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


def save_config(repository: Path, model: str, config: model_config_pb2.ModelConfig) -> None:
    config_path(repository, model).write_text(text_format.MessageToString(config))


def models(repository: Path) -> list[str]:
    return sorted(p.name for p in Path(repository).iterdir() if (p / "config.pbtxt").is_file())


def parameters(config: model_config_pb2.ModelConfig) -> dict[str, str]:
    return {key: value.string_value for key, value in config.parameters.items()}


def set_parameters(repository: Path, model: str, values: Mapping[str, str]) -> None:
    config = load_config(repository, model)
    for key, value in values.items():
        config.parameters[key].string_value = str(value)
    save_config(repository, model, config)


def copy_repository(source: Path, target: Path) -> Path:
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__"))
    return target
