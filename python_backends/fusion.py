"""The fusion model's handler: N modalities in, one representation (and a match score) out. No Triton.

The contract is N modalities. For modality ``M`` (upper case, from the ``modalities``
parameter) the fusion model reads ``M_EMBEDDING`` [B,D], ``M_VALID`` [B,1] and, optionally,
``M_STATUS`` [B,1], ``M_SEQUENCE`` [B,T,W] and ``M_SEQUENCE_MASK`` [B,T] (token-level
strategies); it writes

* ``FUSED`` [B,D]: the fused representation (zeros when nothing contributed),
* ``MODALITY_MASK`` [B,N]: which modalities contributed to each row,
* ``MODALITY_STATUS`` [B,N]: why a modality did or did not (ok, missing, ...),
* ``SCORE`` [B,1]: the match probability, where the strategy has a trained ``match`` head
  (0.5 when nothing is present);
* ``PROBS`` [B,C] and ``LABEL`` [B,1], where it has a trained ``classify`` head: the class
  probabilities (softmax, in the order of the head's class names; uniform when nothing is
  present) and the most probable class name (empty when nothing is present).

Adding a modality is a config edit (a new encoder, the ensemble, this list), not a code change.
Each row is computed from that row alone. The strategies live in python_backends/strategies/.

Parameters: the handler's ``parameters`` (docs/configuration.md is generated from them).
"""
from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mmfuse.wire import MISSING, NON_FINITE, OK, column_bytes, status_matrix

from .errors import ConfigError, InvalidInputError
from .handler import Handler, InputSpec
from .params import ModelContext, Params

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
    head_dir: Path | None = None
    allow_random_init: bool = False
    seed: int = 0
    options: str = "{}"  # JSON hyper-parameters of an untrained (random-init) strategy
    torch_threads: int = 0  # intra-op threads of the model's process (0: torch's default)
    classes: tuple[str, ...] = ()  # the class names the head must have (written by export; shown by metadata)

    STRATEGIES = ("late", "early", "hybrid", "attention")

    @classmethod
    def from_params(cls, params: Params, context: ModelContext | None = None) -> FusionConfig:
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
        head = params.str("head_dir", "")
        head_dir = None
        if head:
            base = context.version_dir if context is not None else Path.cwd()
            head_dir = (base / head).resolve() if not Path(head).is_absolute() else Path(head)
        options = params.str("strategy_options", "{}") or "{}"
        try:
            parsed = json.loads(options)
        except ValueError:
            raise ConfigError(f"model '{params.model_name}': parameter 'strategy_options' is not JSON: {options!r}") from None
        if not isinstance(parsed, dict):
            raise ConfigError(f"model '{params.model_name}': parameter 'strategy_options' must be a JSON object: "
                              f"{options!r}")
        random_init = params.bool("allow_random_init", False)
        if parsed and random_init and head_dir is None:  # the options are used: a typo fails here, offline
            from .strategies.base import hyperparameters

            known = hyperparameters(strategy)
            unknown = sorted(set(parsed) - set(known))
            if unknown:
                raise ConfigError(f"model '{params.model_name}': parameter 'strategy_options' sets {', '.join(unknown)}, "
                                  f"which strategy {strategy!r} does not take; it takes: {', '.join(known)}")
        classes = params.str("classes", "") or "[]"
        try:
            classes = json.loads(classes)
        except ValueError:
            classes = None
        if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
            raise ConfigError(f"model '{params.model_name}': parameter 'classes' must be a JSON list of class names, "
                              f"got {params.str('classes', '')!r}")
        return cls(strategy, modalities, weights, params.bool("normalize", True), head_dir,
                   random_init, params.int("seed", 0, minimum=0), options,
                   params.int("torch_threads", 0, minimum=0), tuple(classes))


def load_strategy(config: FusionConfig, model_name: str = "fusion"):
    """The torch module of a configured strategy, or None for plain late fusion (numpy, fixed weights)."""
    import torch

    from .strategies import build, load_head
    from .strategies.base import HEAD_CONFIG

    if config.head_dir is not None:
        if not (config.head_dir / HEAD_CONFIG).is_file():
            raise ConfigError(f"model '{model_name}': head_dir {config.head_dir} has no {HEAD_CONFIG}")
        module, description = load_head(config.head_dir)
        if description["strategy"] != config.strategy:
            raise ConfigError(f"model '{model_name}': head in {config.head_dir} is a {description['strategy']!r} "
                              f"head but parameter 'strategy' is {config.strategy!r}")
        if tuple(module.modalities) != config.modalities:
            raise ConfigError(f"model '{model_name}': head modalities {module.modalities} != parameter "
                              f"'modalities' {config.modalities}")
        if config.classes and tuple(module.classes) != config.classes:
            raise ConfigError(f"model '{model_name}': head in {config.head_dir} has classes {list(module.classes)} "
                              f"but parameter 'classes' says {list(config.classes)}")
        return module
    if config.strategy == "late" and not config.allow_random_init:
        return None  # fixed weights: plain numpy
    if not config.allow_random_init:
        raise ConfigError(
            f"model '{model_name}': strategy {config.strategy!r} has learned weights: set 'head_dir' to a head "
            "exported by `mmfuse train`, or 'allow_random_init' to 'true' (tests only)")
    options = json.loads(config.options)
    embed_dim = options.pop("embed_dim", None)
    if embed_dim is None:
        raise ConfigError(f"model '{model_name}': random-init strategy needs 'embed_dim' in strategy_options")
    if config.strategy == "late":  # the fixed-weight parameters still apply
        options.setdefault("weights", list(config.weights))
        options.setdefault("normalize", config.normalize)
    torch.manual_seed(config.seed)
    module = build(config.strategy, config.modalities, int(embed_dim), **options).eval()
    if config.classes and tuple(module.classes) != config.classes:
        raise ConfigError(f"model '{model_name}': strategy_options classes {list(module.classes)} != parameter "
                          f"'classes' {list(config.classes)}")
    return module


def pooled_inputs(batch: Mapping[str, np.ndarray], names: Sequence[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(embeddings [B,M,D], VALID [B,M], present [B,M]) of the fusion inputs; a non-finite embedding is not
    present (it must not poison the fused vector)."""
    rows = batch[f"{names[0]}_EMBEDDING"].shape[0]
    valid = np.stack([np.asarray(batch[f"{m}_VALID"]).reshape(rows) for m in names], axis=1).astype(bool)
    stacked = np.stack([np.asarray(batch[f"{m}_EMBEDDING"], dtype=np.float32) for m in names], axis=1)
    return stacked, valid, valid & np.isfinite(stacked).all(axis=2)


def module_batch(batch: Mapping[str, np.ndarray], names: Sequence[str], needs_sequences: bool,
                 who: str = "fusion", present: np.ndarray | None = None):
    """The fusion inputs of a batch as a strategy module's FusionBatch: what the served fusion model runs and what
    ``mmfuse train`` trains on (``present``: a narrower presence mask, e.g. modality dropout)."""
    import torch

    from .strategies import FusionBatch

    stacked, _, found = pooled_inputs(batch, names)
    present = found if present is None else (np.asarray(present, dtype=bool) & found)
    sequences, masks = [], []
    for m in names:
        seq = batch.get(f"{m}_SEQUENCE")
        if seq is None:
            if needs_sequences:
                raise InvalidInputError(f"{who} needs input tensor '{m}_SEQUENCE'")
            sequences.append(None)
            masks.append(None)
            continue
        seq = np.nan_to_num(np.asarray(seq, dtype=np.float32))
        mask = batch.get(f"{m}_SEQUENCE_MASK")
        mask = np.ones(seq.shape[:2], dtype=bool) if mask is None else np.asarray(mask).astype(bool)
        sequences.append(torch.from_numpy(seq))
        masks.append(torch.from_numpy(mask))
    embeddings = np.where(present[:, :, None], stacked, 0.0).astype(np.float32)
    return FusionBatch(torch.from_numpy(embeddings), torch.from_numpy(present), sequences, masks)


TASK_OUTPUTS = ("SCORE", "PROBS", "LABEL")
OUTPUTS_OF_TASK = {"match": ("SCORE",), "classify": ("PROBS", "LABEL")}


class FusionHandler(Handler):
    """Handler of the fusion models: N modalities in, FUSED, MODALITY_MASK, MODALITY_STATUS (+ SCORE or PROBS and
    LABEL, by the head's task) out."""

    name = "fusion"
    metrics_labels = ("all", "fusion")
    parameters = {
        "strategy": "late (masked weighted mean, or a trained head), early, hybrid, attention",
        "modalities": "comma-separated modality names, in MODALITY_MASK order; input tensors are <M>_EMBEDDING, "
                      "<M>_VALID, <M>_STATUS, <M>_SEQUENCE, <M>_SEQUENCE_MASK",
        "weights": "late without a head: one non-negative weight per modality",
        "normalize": "late without a head: L2-normalise FUSED",
        "head_dir": "a trained head (mmfuse train): folder with fusion_head.json and fusion_head.safetensors, "
                    "relative to the served version folder (\".\" = that folder)",
        "allow_random_init": "learned strategies without a head get seeded random weights (tests only)",
        "seed": "seed of that random init",
        "strategy_options": "JSON hyper-parameters of a random-init strategy (must include embed_dim; a key the "
                            "strategy does not take is refused); ignored with a head",
        "torch_threads": "intra-op threads of this model's process (0: torch's default)",
        "classes": "JSON list of the class names of a classify head, in PROBS order (written by `mmfuse train`; the "
                   "head must have exactly these; shown by `mmfuse metadata`); empty: not checked",
    }

    def __init__(self, config: FusionConfig, model_name: str = "fusion"):
        self.config = config
        self.model_name = model_name
        self.module = load_strategy(config, model_name)

    @classmethod
    def parse(cls, context: ModelContext, params: Params) -> FusionConfig:
        return FusionConfig.from_params(params, context)

    @classmethod
    def input_specs(cls, config: FusionConfig) -> tuple[InputSpec, ...]:
        return tuple(
            spec
            for m in config.modalities
            for spec in (
                InputSpec(f"{m}_EMBEDDING", "f", row_rank=1),
                InputSpec(f"{m}_VALID", "b"),
                InputSpec(f"{m}_STATUS", "O", optional=True),
                InputSpec(f"{m}_SEQUENCE", "f", optional=True, row_rank=2),
                InputSpec(f"{m}_SEQUENCE_MASK", "b", optional=True, row_rank=1),
            )
        )

    @classmethod
    def output_names(cls, config: FusionConfig) -> tuple[str, ...]:
        return ("FUSED", "MODALITY_MASK", "MODALITY_STATUS") + TASK_OUTPUTS

    @classmethod
    def optional_output_names(cls, config: FusionConfig) -> tuple[str, ...]:
        return TASK_OUTPUTS  # known for sure only once the head is loaded: see ``optional_outputs``

    @classmethod
    def build(cls, context: ModelContext, config: FusionConfig) -> FusionHandler:
        if config.torch_threads:  # measured: the attention head on 2 threads beside the encoders ran 7-90x slower
            import torch

            torch.set_num_threads(config.torch_threads)
        return cls(config, context.model_name)

    @property
    def task(self) -> str | None:
        """The task of the trained head (match | classify), None without one."""
        return self.module.task if self.module is not None and self.module.has_head else None

    @property
    def has_score(self) -> bool:
        return self.task == "match"

    @property
    def optional_outputs(self) -> tuple[str, ...]:
        return tuple(name for name in TASK_OUTPUTS if name not in OUTPUTS_OF_TASK.get(self.task, ()))

    def __call__(self, batch: Mapping[str, np.ndarray], requested: frozenset[str]) -> dict[str, np.ndarray]:
        names = self.config.modalities
        embeddings = [batch[f"{m}_EMBEDDING"] for m in names]
        dims = {e.shape[1] for e in embeddings}
        if len(dims) != 1:
            shapes = ", ".join(f"{m}_EMBEDDING {list(e.shape)}" for m, e in zip(names, embeddings))
            raise InvalidInputError(f"model '{self.model_name}': embedding sizes differ: {shapes}")
        unavailable = sorted(requested & set(self.optional_outputs))
        if unavailable:
            has = f"a {self.task} head" if self.task else "no task head (set head_dir)"
            raise InvalidInputError(f"model '{self.model_name}': output {', '.join(unavailable)} requested but "
                                    f"strategy {self.config.strategy!r} has {has}")
        rows = embeddings[0].shape[0]
        stacked, valid, present = pooled_inputs(batch, names)
        finite = np.isfinite(stacked).all(axis=2)
        out = {}
        if self.module is None:
            out["FUSED"], out["MODALITY_MASK"] = late_fusion(stacked, present, self.config.weights, self.config.normalize)
        else:
            out.update(self._run_module(batch, present))
        statuses = []
        for m, is_valid in zip(names, valid.T):
            given = column_bytes(batch[f"{m}_STATUS"]) if f"{m}_STATUS" in batch else None
            statuses.append([
                (given[i].decode() if given is not None else (OK if is_valid[i] else MISSING))
                for i in range(rows)
            ])
        status_rows = [[statuses[j][i] for j in range(len(names))] for i in range(rows)]
        for i, j in zip(*np.nonzero(valid & ~finite)):
            status_rows[i][j] = NON_FINITE
        out["MODALITY_STATUS"] = status_matrix(status_rows)
        return out

    def _run_module(self, batch, present: np.ndarray) -> dict[str, np.ndarray]:
        import torch

        rows = present.shape[0]
        inputs = module_batch(batch, self.config.modalities, self.module.needs_sequences,
                              f"model '{self.model_name}': strategy {self.config.strategy!r}")
        with torch.inference_mode():
            result = self.module(inputs)
        out = {"FUSED": result.fused.float().numpy(), "MODALITY_MASK": result.contributed.numpy()}
        if self.task == "match":
            out["SCORE"] = torch.sigmoid(result.logit.float()).numpy().reshape(rows, 1)
        elif self.task == "classify":
            probs = torch.softmax(result.logit.float(), dim=-1).numpy()
            out["PROBS"] = probs
            names = np.asarray([c.encode() for c in self.module.classes], dtype=object)
            labels = np.where(present.any(axis=1), names[probs.argmax(axis=1)], b"")
            out["LABEL"] = labels.astype(object).reshape(rows, 1)
        return out
