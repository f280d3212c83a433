"""The strategy contract, the registry and head files (safetensors weights + JSON description)."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

HEAD_WEIGHTS = "fusion_head.safetensors"
HEAD_CONFIG = "fusion_head.json"


@dataclass
class FusionBatch:
    embeddings: torch.Tensor  # [B, M, D] float
    mask: torch.Tensor  # [B, M] bool: modality present
    sequences: list[torch.Tensor | None] = field(default_factory=list)  # per modality [B, T, W]
    sequence_masks: list[torch.Tensor | None] = field(default_factory=list)  # per modality [B, T] bool

    @property
    def rows(self) -> int:
        return self.embeddings.shape[0]


@dataclass
class FusionOutput:
    fused: torch.Tensor  # [B, F]
    logit: torch.Tensor | None  # task head: match logit [B], or classify logits [B, C]; None without a head
    contributed: torch.Tensor  # [B, M] bool
    tokens: torch.Tensor | None = None  # token-level strategies: the final text-stream states [B, L, dim]


TASKS = ("match", "classify")
WHITEN_SHRINKAGE = 1e-3  # measured on the classify dataset: 1e-4..1e-3 best, 1e-1 loses 8 points on text


def check_task(task: str, classes: Any) -> tuple[str, tuple[str, ...]]:
    """``match``: one logit (the caption matches the image); ``classify``: one logit per named class."""
    if task not in TASKS:
        raise ValueError(f"task must be one of {', '.join(TASKS)}, got {task!r}")
    if task == "match":
        if classes:
            raise ValueError("task 'match' takes no class names")
        return task, ()
    names = tuple(str(c) for c in (classes or ()))
    if len(names) < 2 or len(set(names)) != len(names) or not all(names):
        raise ValueError(f"task 'classify' needs at least two distinct, non-empty class names, got {list(names)}")
    return task, names


class FusionStrategy(nn.Module):
    """Base class. Subclasses set ``name`` and ``needs_sequences`` and implement ``fuse``.

    Every strategy takes ``task`` ("match": a logit [B]; "classify": logits [B, C] in the order of
    ``classes``); its task head, where it has one, has ``outputs`` units. With ``whiten`` every present
    pooled embedding is whitened first, per modality: ``(e - input_mean[m]) @ input_whiten[m]`` (buffers [M, D]
    and [M, D, D], set from the training rows by ``mmfuse train --data`` and saved with the head). A CLIP
    text embedding's covariance spans many orders of magnitude (the demo text tower: eigenvalues from 1e-9 to
    0.12), so a head trained on raw embeddings by gradient steps learns the small-variance, informative
    directions far too slowly (measured: docs/training.md).
    """

    name = "base"
    needs_sequences = False

    def __init__(self, modalities: tuple[str, ...], embed_dim: int, task: str = "match", classes: Any = None,
                 whiten: bool = False, **hparams: Any):
        super().__init__()
        self.modalities = tuple(modalities)
        self.embed_dim = int(embed_dim)
        self.task, self.classes = check_task(task, classes)
        self.hparams = dict(hparams)
        if self.task == "classify":  # recorded (and rebuilt from the head JSON) only where not the default
            self.hparams.update(task=self.task, classes=list(self.classes))
        self.whiten = bool(whiten)
        if self.whiten:
            self.hparams["whiten"] = True
            self.register_buffer("input_mean", torch.zeros(len(self.modalities), self.embed_dim))
            self.register_buffer("input_whiten", torch.eye(self.embed_dim).repeat(len(self.modalities), 1, 1))

    def set_input_statistics(self, embeddings, present, shrinkage: float = WHITEN_SHRINKAGE) -> None:
        """``input_mean`` and ``input_whiten`` (the inverse square root of the covariance, shrunk towards
        ``shrinkage`` x its mean eigenvalue) from embeddings [N, M, D] where present [N, M]; a modality present in
        fewer than two rows keeps 0 and the identity."""
        if not self.whiten:
            raise ValueError("this head was built without whiten")
        e = torch.as_tensor(embeddings, dtype=torch.float64)
        has = torch.as_tensor(present, dtype=torch.bool)
        with torch.no_grad():
            for i in range(len(self.modalities)):
                rows = e[has[:, i], i]
                if len(rows) < 2:
                    continue
                mean = rows.mean(0)
                values, vectors = torch.linalg.eigh(torch.cov((rows - mean).T))
                values = values.clamp(min=0)
                inverse_root = 1.0 / torch.sqrt(values + shrinkage * values.mean().clamp(min=1e-12))
                self.input_mean[i] = mean.float()
                self.input_whiten[i] = (vectors @ torch.diag(inverse_root) @ vectors.T).float()

    @property
    def outputs(self) -> int:
        """Units of the task head: 1 (match) or the number of classes."""
        return len(self.classes) if self.task == "classify" else 1

    def head_logits(self, x: torch.Tensor) -> torch.Tensor:
        """A head's raw output [B, outputs] as the task's logit: [B] (match) or [B, C]."""
        return x.squeeze(-1) if self.task == "match" else x

    @property
    def has_head(self) -> bool:
        return False

    def fuse(self, batch: FusionBatch) -> FusionOutput:
        raise NotImplementedError

    def forward(self, batch: FusionBatch) -> FusionOutput:
        batch = sanitize(batch)
        if self.whiten:
            white = torch.einsum("bmd,mde->bme", batch.embeddings - self.input_mean, self.input_whiten)
            batch = FusionBatch(torch.where(batch.mask.unsqueeze(-1), white, 0.0), batch.mask, batch.sequences,
                                batch.sequence_masks)
        out = self.fuse(batch)
        nothing = ~batch.mask.any(dim=1)
        fused = torch.where(nothing[:, None], torch.zeros_like(out.fused), out.fused)
        logit = out.logit
        if logit is not None:  # nothing present: score 0.5 (match), uniform PROBS (classify)
            undecided = nothing if logit.dim() == 1 else nothing[:, None]
            logit = torch.where(undecided, torch.zeros_like(logit), logit)
        return FusionOutput(torch.nan_to_num(fused), logit, out.contributed & batch.mask, out.tokens)

    def describe(self) -> dict[str, Any]:
        return {"strategy": self.name, "modalities": list(self.modalities), "embed_dim": self.embed_dim,
                "hparams": self.hparams}


def sanitize(batch: FusionBatch) -> FusionBatch:
    """Zero what is masked (absent modalities, padding) and any non-finite value, so that masked
    content can never reach a result (0 * NaN is NaN inside attention)."""
    embeddings = torch.where(batch.mask.unsqueeze(-1), torch.nan_to_num(batch.embeddings), 0.0)
    sequences, masks = [], []
    for i, (seq, valid) in enumerate(zip(batch.sequences, batch.sequence_masks)):
        if seq is None:
            sequences.append(None)
            masks.append(None)
            continue
        valid = (torch.ones(seq.shape[:2], dtype=torch.bool) if valid is None else valid) & batch.mask[:, i : i + 1]
        sequences.append(torch.where(valid.unsqueeze(-1), torch.nan_to_num(seq), 0.0))
        masks.append(valid)
    return FusionBatch(embeddings, batch.mask, sequences, masks)


STRATEGIES: dict[str, type[FusionStrategy]] = {}


def register(cls: type[FusionStrategy]) -> type[FusionStrategy]:
    STRATEGIES[cls.name] = cls
    return cls


def strategy_class(name: str) -> type[FusionStrategy]:
    from . import attention, early, hybrid, late  # noqa: F401 - registration

    if name not in STRATEGIES:
        raise KeyError(f"unknown fusion strategy {name!r}; known: {', '.join(sorted(STRATEGIES))}")
    return STRATEGIES[name]


def hyperparameters(name: str) -> list[str]:
    """The keyword hyper-parameters strategy ``name`` takes (what ``strategy_options`` may set)."""
    import inspect

    parameters = inspect.signature(strategy_class(name).__init__).parameters
    return [p for p in parameters if p not in ("self", "modalities")
            and parameters[p].kind not in (inspect.Parameter.VAR_KEYWORD, inspect.Parameter.VAR_POSITIONAL)]


def build(name: str, modalities: tuple[str, ...], embed_dim: int, **hparams: Any) -> FusionStrategy:
    return strategy_class(name)(tuple(modalities), embed_dim, **hparams)


def save_head(strategy: FusionStrategy, directory: Path, extra: dict[str, Any] | None = None) -> Path:
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in strategy.state_dict().items()}
    save_file(state, str(directory / HEAD_WEIGHTS))
    (directory / HEAD_CONFIG).write_text(json.dumps({**strategy.describe(), **(extra or {})}, indent=2) + "\n")
    return directory


def load_head(directory: Path) -> tuple[FusionStrategy, dict[str, Any]]:
    """A trained head: its JSON says which strategy and hyper-parameters; weights are safetensors only."""
    from safetensors.torch import load_file

    directory = Path(directory)
    description = json.loads((directory / HEAD_CONFIG).read_text())
    strategy = build(description["strategy"], tuple(description["modalities"]), description["embed_dim"],
                     **description.get("hparams", {}))
    strategy.load_state_dict(load_file(str(directory / HEAD_WEIGHTS)), strict=True)
    strategy.eval()
    return strategy, description


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over dim 1 of x [B,T,W] where mask [B,T]; zeros where nothing is valid."""
    w = mask.to(x.dtype).unsqueeze(-1)
    return (x * w).sum(1) / w.sum(1).clamp(min=1.0)


def last_valid(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """x[b, index of the last True in mask[b]] (index 0 where none)."""
    idx = (mask.long().cumsum(1).argmax(1))
    return x[torch.arange(x.shape[0], device=x.device), idx]
