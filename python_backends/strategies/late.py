"""Late fusion: each modality encoded alone; combined at the end."""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from .base import FusionBatch, FusionOutput, FusionStrategy, register


@register
class LateFusion(FusionStrategy):
    """hparams: weights (fixed, per modality), gate ("fixed" | "gmu"), head ("none" | "similarity"),
    normalize (L2-normalise FUSED)."""

    name = "late"

    def __init__(self, modalities, embed_dim, weights=None, gate="fixed", head="none", normalize=True):
        weights = list(weights) if weights is not None else [1.0] * len(modalities)
        super().__init__(modalities, embed_dim, weights=weights, gate=gate, head=head, normalize=normalize)
        if len(weights) != len(modalities):
            raise ValueError(f"late fusion: {len(weights)} weights for {len(modalities)} modalities")
        if gate not in ("fixed", "gmu") or head not in ("none", "similarity"):
            raise ValueError(f"late fusion: gate must be fixed|gmu and head none|similarity, got {gate!r}, {head!r}")
        self.register_buffer("weights", torch.tensor(weights, dtype=torch.float32))
        m = len(modalities)
        if gate == "gmu":  # gated multimodal unit: h_m = tanh(W_m e_m), z = softmax(W_z [e_1..e_M])
            self.transforms = nn.ModuleList(nn.Linear(embed_dim, embed_dim) for _ in range(m))
            self.gate = nn.Linear(m * embed_dim, m)
        if head == "similarity":
            if m != 2:
                raise ValueError("late fusion: the similarity head needs exactly two modalities")
            self.scale = nn.Parameter(torch.tensor(10.0))
            self.bias = nn.Parameter(torch.tensor(0.0))
        self.normalize = normalize

    @property
    def has_head(self) -> bool:
        return self.hparams["head"] != "none"

    def fuse(self, batch: FusionBatch) -> FusionOutput:
        e, mask = batch.embeddings, batch.mask
        if self.hparams["gate"] == "gmu":
            masked = e * mask.unsqueeze(-1)
            logits = self.gate(masked.flatten(1)).masked_fill(~mask, float("-inf"))
            z = torch.nan_to_num(torch.softmax(logits, dim=1))  # all-absent rows: nan -> 0
            h = torch.stack([torch.tanh(t(e[:, i])) for i, t in enumerate(self.transforms)], dim=1)
            fused = (z.unsqueeze(-1) * h).sum(1)
            contributed = mask & (z > 0)
        else:
            w = self.weights[None, :] * mask
            fused = (w.unsqueeze(-1) * e).sum(1) / w.sum(1, keepdim=True).clamp(min=1e-12)
            contributed = w > 0
        if self.normalize:
            fused = F.normalize(fused, dim=-1)
        logit = None
        if self.has_head:
            both = mask.all(dim=1)
            cos = F.cosine_similarity(e[:, 0], e[:, 1], dim=-1)
            logit = torch.where(both, self.scale * cos + self.bias, torch.zeros_like(cos))
        return FusionOutput(fused, logit, contributed)
