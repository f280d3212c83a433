"""Tabular rows -> embeddings in the same space size as the image and text towers (a third modality).

A small fixed network with seeded weights: features are standardised, projected
(``hidden_dim`` 0: one affine map; > 0: affine, ReLU, affine) to ``embed_dim`` and
L2-normalised. Same seed, same weights, in every process: the encoder is
deterministic and needs no weight file. Plain numpy, no Triton.

A row is per-row masked, never failing the batch:

* all values NaN -> status ``missing`` (how a client says "no tabular data for this row"),
* any other non-finite value (NaN, +-inf) -> ``undecodable``,
* otherwise ``ok``.

Parameters: the handler's ``parameters`` (docs/configuration.md is generated from them).
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from mmfuse.wire import MISSING, OK, UNDECODABLE, status_column

from .errors import ConfigError, InvalidInputError
from .handler import Handler, InputSpec
from .params import ModelContext, Params

_EPS = 1e-12


@dataclass(frozen=True)
class TabularConfig:
    num_features: int
    embed_dim: int
    hidden_dim: int = 0
    seed: int = 0
    feature_mean: tuple[float, ...] = ()
    feature_scale: tuple[float, ...] = ()

    @classmethod
    def from_params(cls, params: Params) -> TabularConfig:
        num_features = params.int("num_features", minimum=1)
        config = cls(
            num_features=num_features,
            embed_dim=params.int("embed_dim", minimum=1),
            hidden_dim=params.int("hidden_dim", 0, minimum=0),
            seed=params.int("seed", 0, minimum=0),
            feature_mean=params.floats("feature_mean", (0.0,) * num_features),
            feature_scale=params.floats("feature_scale", (1.0,) * num_features),
        )
        for key in ("feature_mean", "feature_scale"):
            values = getattr(config, key)
            if len(values) != num_features:
                raise ConfigError(
                    f"model '{params.model_name}': parameter '{key}' has {len(values)} values "
                    f"for num_features {num_features}"
                )
            if not all(np.isfinite(values)):
                raise ConfigError(f"model '{params.model_name}': parameter '{key}' must be finite: {values}")
        if any(s <= 0 for s in config.feature_scale):
            raise ConfigError(
                f"model '{params.model_name}': parameter 'feature_scale' must be > 0: {config.feature_scale}"
            )
        return config


def tabular_weights(config: TabularConfig) -> list[tuple[np.ndarray, np.ndarray]]:
    """The seeded layers [(W [in,out], b [out]), ...]: scaled so activations stay O(1)."""
    rng = np.random.default_rng(config.seed)
    sizes = [config.num_features] + ([config.hidden_dim] if config.hidden_dim else []) + [config.embed_dim]
    return [
        ((rng.standard_normal((n_in, n_out)) / np.sqrt(n_in)).astype(np.float32),
         (0.1 * rng.standard_normal(n_out)).astype(np.float32))
        for n_in, n_out in zip(sizes[:-1], sizes[1:])
    ]


def row_statuses(features: np.ndarray) -> list[str]:
    finite = np.isfinite(features)
    all_nan = np.isnan(features).all(axis=1)
    return [MISSING if all_nan[i] else (OK if finite[i].all() else UNDECODABLE) for i in range(features.shape[0])]


class TabularEncoder(Handler):
    """Handler of the tabular_encoder model: FEATURES [B,F] -> EMBEDDING [B,D], VALID [B,1], STATUS [B,1]."""

    name = "tabular_encoder"
    metrics_labels = ("tabular", "encode")
    INPUTS = (InputSpec("FEATURES", "f", row_rank=1),)
    OUTPUTS = ("EMBEDDING", "VALID", "STATUS")
    parameters = {
        "num_features": "F, features per row (equals the FEATURES dims of config.pbtxt)",
        "embed_dim": "D, size of EMBEDDING (equals the other towers' embed_dim)",
        "hidden_dim": "width of the hidden layer; 0: a single affine map",
        "seed": "seed of the weights (same seed, same weights in every process)",
        "feature_mean": "F comma-separated means subtracted first",
        "feature_scale": "F comma-separated positive scales divided by next",
    }
    doc_examples = ({"num_features": "8", "embed_dim": "64"},)

    def __init__(self, config: TabularConfig, model_name: str = "tabular_encoder"):
        self.config = config
        self.model_name = model_name
        self.layers = tabular_weights(config)
        self.mean = np.asarray(config.feature_mean, dtype=np.float32)
        self.scale = np.asarray(config.feature_scale, dtype=np.float32)

    @classmethod
    def parse(cls, context: ModelContext, params: Params) -> TabularConfig:
        return TabularConfig.from_params(params)

    @classmethod
    def build(cls, context: ModelContext, config: TabularConfig) -> TabularEncoder:
        return cls(config, context.model_name)

    def encode(self, features: np.ndarray) -> np.ndarray:
        """[N,F] finite rows -> [N,D] L2-normalised embeddings."""
        x = (np.asarray(features, dtype=np.float32) - self.mean) / self.scale
        for i, (weight, bias) in enumerate(self.layers):
            x = x @ weight + bias
            if i < len(self.layers) - 1:
                x = np.maximum(x, 0.0)
        norm = np.linalg.norm(x, axis=1, keepdims=True)
        return np.where(norm > _EPS, x / np.maximum(norm, _EPS), 0.0).astype(np.float32)

    def __call__(self, batch: Mapping[str, np.ndarray], requested: frozenset[str]) -> dict[str, np.ndarray]:
        features = batch["FEATURES"]
        rows, width = features.shape
        if width != self.config.num_features:
            raise InvalidInputError(
                f"model '{self.model_name}': input tensor 'FEATURES' has {width} features per row, "
                f"expected num_features {self.config.num_features}"
            )
        statuses = row_statuses(features)
        valid = np.array([s == OK for s in statuses], dtype=bool)
        embedding = np.zeros((rows, self.config.embed_dim), dtype=np.float32)
        if valid.any():
            embedding[valid] = self.encode(features[valid])
        return {"EMBEDDING": embedding, "VALID": valid.reshape(rows, 1), "STATUS": status_column(statuses)}
