"""Hybrid fusion: the streams exchange token-level representations in a small shared transformer."""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from .base import FusionBatch, FusionOutput, FusionStrategy, register
from .blocks import SelfAttentionBlock, trim


@register
class HybridFusion(FusionStrategy):
    """hparams: widths (token width per modality), dim, heads, layers, head (bool), task, classes.

    Tokens of every modality are projected to ``dim``, tagged with a learned modality-type
    embedding, and processed jointly behind one [CLS] token under a padding/absence mask;
    FUSED and the score are read from [CLS].
    """

    name = "hybrid"
    needs_sequences = True

    def __init__(self, modalities, embed_dim, widths=None, dim=128, heads=4, layers=2, head=True, task="match",
                 classes=None, whiten=False):
        widths = list(widths) if widths is not None else [64] * len(modalities)
        super().__init__(modalities, embed_dim, task, classes, whiten, widths=widths, dim=dim, heads=heads, layers=layers,
                         head=head)
        self.proj = nn.ModuleList(nn.Linear(w, dim) for w in widths)
        self.type_embedding = nn.Parameter(torch.randn(len(modalities), dim) * 0.02)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.blocks = nn.ModuleList(SelfAttentionBlock(dim, heads) for _ in range(layers))
        self.ln = nn.LayerNorm(dim)
        self.out = nn.Linear(dim, embed_dim)
        self.head = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, self.outputs)) if head else None

    @property
    def has_head(self) -> bool:
        return self.head is not None

    def fuse(self, batch: FusionBatch) -> FusionOutput:
        rows = batch.rows
        tokens = [self.cls.expand(rows, 1, -1)]
        valid = [torch.ones(rows, 1, dtype=torch.bool, device=batch.mask.device)]
        for i, (seq, seq_valid) in enumerate(zip(batch.sequences, batch.sequence_masks)):
            seq, seq_valid = trim(seq, seq_valid & batch.mask[:, i : i + 1])
            tokens.append(self.proj[i](seq) + self.type_embedding[i])
            valid.append(seq_valid)
        x, valid = torch.cat(tokens, dim=1), torch.cat(valid, dim=1)
        for block in self.blocks:
            x = block(x, valid)
        pooled = self.ln(x[:, 0])
        logit = self.head_logits(self.head(pooled)) if self.head is not None else None
        return FusionOutput(F.normalize(self.out(pooled), dim=-1), logit, batch.mask.clone())
