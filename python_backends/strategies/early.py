"""Early fusion: concatenate the per-modality features (absent slot zero-filled, plus presence flags)."""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from .base import FusionBatch, FusionOutput, FusionStrategy, register


@register
class EarlyFusion(FusionStrategy):
    """hparams: hidden (MLP width), layers, dropout, head (bool), task, classes."""

    name = "early"

    def __init__(self, modalities, embed_dim, hidden=256, layers=2, dropout=0.0, head=True, task="match", classes=None,
                 whiten=False):
        super().__init__(modalities, embed_dim, task, classes, whiten, hidden=hidden, layers=layers, dropout=dropout, head=head)
        m = len(modalities)
        dims = [m * embed_dim + m] + [hidden] * (layers - 1)
        blocks = []
        for a, b in zip(dims[:-1], dims[1:]):
            blocks += [nn.Linear(a, b), nn.GELU(), nn.Dropout(dropout)]
        self.mlp = nn.Sequential(*blocks)
        self.out = nn.Linear(dims[-1], embed_dim)
        self.head = nn.Linear(dims[-1], self.outputs) if head else None

    @property
    def has_head(self) -> bool:
        return self.head is not None

    def fuse(self, batch: FusionBatch) -> FusionOutput:
        mask = batch.mask
        x = torch.cat([(batch.embeddings * mask.unsqueeze(-1)).flatten(1), mask.float()], dim=1)
        h = self.mlp(x)
        logit = self.head_logits(self.head(h)) if self.head is not None else None
        return FusionOutput(F.normalize(self.out(h), dim=-1), logit, mask.clone())
