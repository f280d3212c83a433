"""Fusion of per-modality embeddings: plain numpy, no Triton.

The contract is N modalities. For modality ``M`` (upper case, from the
``modalities`` parameter) the fusion model reads ``M_EMBEDDING`` [B,D],
``M_VALID`` [B,1] and, optionally, ``M_STATUS`` [B,1]; it writes

* ``FUSED`` [B,D]: the fused representation (zeros when nothing contributed),
* ``MODALITY_MASK`` [B,N]: which modalities contributed to each row,
* ``MODALITY_STATUS`` [B,N]: why a modality did or did not (ok, missing, ...).

Adding a modality is a config edit (a new encoder, the ensemble, this list), not
a code change. Each row is computed from that row alone.

Parameters (config.pbtxt):

==========  ==========================================================================
strategy    ``late`` (masked weighted mean of the embeddings)
modalities  comma-separated modality names, in MODALITY_MASK order (default image,text)
weights     one non-negative weight per modality (default: all 1)
normalize   L2-normalise FUSED (default true)
==========  ==========================================================================
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

from .errors import ConfigError, InvalidInputError
from .params import ModelContext, Params
from .serving import TensorSpec
from .status import MISSING, OK, column_bytes, join

_EPS = 1e-12


def l2_normalize(x: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(x, axis=-1, keepdims=True)
    return np.where(norm > _EPS, x / np.maximum(norm, _EPS), 0.0).astype(np.float32)


def late_fusion(embeddings: np.ndarray, mask: np.ndarray, weights: Sequence[float], normalize: bool = True):
    """Masked weighted mean.

    embeddings [B,N,D] float, mask [B,N] bool, weights [N] >= 0.
    Returns (fused [B,D] float32, contributed [B,N] bool). A row with no contributing
    modality is all zeros: defined, never NaN.
    """
    embeddings = np.asarray(embeddings, dtype=np.float32)
    mask = np.asarray(mask, dtype=bool)
    w = np.asarray(weights, dtype=np.float32)[None, :] * mask  # [B,N]
    contributed = w > 0
    # 0 * NaN is NaN: a masked modality must not reach the sum whatever it holds.
    embeddings = np.where(contributed[:, :, None], embeddings, 0.0)
    total = w.sum(axis=1, keepdims=True)  # [B,1]
    fused = np.einsum("bn,bnd->bd", w, embeddings) / np.maximum(total, _EPS)
    fused = np.where(total > 0, fused, 0.0).astype(np.float32)
    return (l2_normalize(fused) if normalize else fused), contributed


@dataclass(frozen=True)
class FusionConfig:
    strategy: str
    modalities: tuple[str, ...]
    weights: tuple[float, ...]
    normalize: bool = True

    STRATEGIES = ("late",)

    @classmethod
    def from_params(cls, params: Params) -> "FusionConfig":
        strategy = params.choice("strategy", "late", cls.STRATEGIES)
        modalities = tuple(m.upper() for m in params.list("modalities", ("image", "text")))
        if len(set(modalities)) != len(modalities):
            raise ConfigError(f"model '{params.model_name}': parameter 'modalities' repeats a name: {modalities}")
        weights = params.floats("weights", (1.0,) * len(modalities))
        if len(weights) != len(modalities):
            raise ConfigError(
                f"model '{params.model_name}': parameter 'weights' has {len(weights)} values "
                f"for {len(modalities)} modalities ({', '.join(modalities)})"
            )
        if any(w < 0 or not np.isfinite(w) for w in weights):
            raise ConfigError(f"model '{params.model_name}': parameter 'weights' must be finite and >= 0: {weights}")
        return cls(strategy, modalities, weights, params.bool("normalize", True))


class FusionHandler:
    """Handler of the fusion model."""

    def __init__(self, config: FusionConfig, model_name: str = "fusion"):
        self.config = config
        self.model_name = model_name
        self.inputs = tuple(
            spec
            for m in config.modalities
            for spec in (
                TensorSpec(f"{m}_EMBEDDING", "f", row_rank=1),
                TensorSpec(f"{m}_VALID", "b"),
                TensorSpec(f"{m}_STATUS", "O", optional=True),
            )
        )

    @classmethod
    def from_parameters(cls, context: ModelContext, params: Params) -> "FusionHandler":
        return cls(FusionConfig.from_params(params), context.model_name)

    def __call__(self, batch: Mapping[str, np.ndarray], requested: frozenset[str]) -> dict[str, np.ndarray]:
        names = self.config.modalities
        embeddings = [batch[f"{m}_EMBEDDING"] for m in names]
        dims = {e.shape[1] for e in embeddings}
        if len(dims) != 1:
            shapes = ", ".join(f"{m}_EMBEDDING {list(e.shape)}" for m, e in zip(names, embeddings))
            raise InvalidInputError(f"model '{self.model_name}': embedding sizes differ: {shapes}")
        rows = embeddings[0].shape[0]
        valid = np.stack([batch[f"{m}_VALID"].reshape(rows) for m in names], axis=1)
        stacked = np.stack(embeddings, axis=1)
        # A non-finite embedding must not poison the fused vector: treat it as absent.
        finite = np.isfinite(stacked).all(axis=2)
        fused, contributed = late_fusion(stacked, valid & finite, self.config.weights, self.config.normalize)
        statuses = []
        for m, is_valid in zip(names, valid.T):
            given = column_bytes(batch[f"{m}_STATUS"]) if f"{m}_STATUS" in batch else None
            statuses.append([
                (given[i].decode() if given is not None else (OK if is_valid[i] else MISSING))
                for i in range(rows)
            ])
        status_rows = [[statuses[j][i] for j in range(len(names))] for i in range(rows)]
        for i, j in zip(*np.nonzero(valid & ~finite)):
            status_rows[i][j] = "non_finite"
        return {"FUSED": fused, "MODALITY_MASK": contributed, "MODALITY_STATUS": join(status_rows)}
