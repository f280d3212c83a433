"""Late fusion: each modality encoded alone; combined at the end."""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from .base import FusionBatch, FusionOutput, FusionStrategy, register


@register
class LateFusion(FusionStrategy):
    """hparams: weights (fixed, per modality), gate ("fixed" | "gmu"), head ("none" | "similarity" |
    "classifier"), normalize (L2-normalise FUSED), task, classes.

    Task heads: ``similarity`` (match) is a logistic on the image-text cosine (CLIP's decision);
    ``classifier`` is, with the fixed gate, decision-level fusion — one linear classifier per modality, their
    class probabilities averaged over the modalities present (``weights`` weighting them) — and, with the
    GMU gate, one linear classifier on the gated representation. Either serves match (one unit) or
    classify (one unit per class).
    """

    name = "late"
    HEADS = ("none", "similarity", "classifier")

    def __init__(self, modalities, embed_dim, weights=None, gate="fixed", head="none", normalize=True, task="match",
                 classes=None, whiten=False):
        weights = list(weights) if weights is not None else [1.0] * len(modalities)
        super().__init__(modalities, embed_dim, task, classes, whiten, weights=weights, gate=gate, head=head,
                         normalize=normalize)
        if len(weights) != len(modalities):
            raise ValueError(f"late fusion: {len(weights)} weights for {len(modalities)} modalities")
        if gate not in ("fixed", "gmu") or head not in self.HEADS:
            raise ValueError(f"late fusion: gate must be fixed|gmu and head {'|'.join(self.HEADS)}, "
                             f"got {gate!r}, {head!r}")
        if head == "similarity" and self.task != "match":
            raise ValueError("late fusion: the similarity head scores a match; for classify use head 'classifier'")
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
        if head == "classifier":
            count = m if gate == "fixed" else 1  # one classifier per modality, or one on the gated vector
            self.classifiers = nn.ModuleList(nn.Linear(embed_dim, self.outputs) for _ in range(count))
        self.normalize = normalize

    @property
    def has_head(self) -> bool:
        return self.hparams["head"] != "none"

    def fuse(self, batch: FusionBatch) -> FusionOutput:
        e, mask = batch.embeddings, batch.mask
        gated = None
        if self.hparams["gate"] == "gmu":
            masked = e * mask.unsqueeze(-1)
            logits = self.gate(masked.flatten(1)).masked_fill(~mask, float("-inf"))
            z = torch.nan_to_num(torch.softmax(logits, dim=1))  # all-absent rows: nan -> 0
            h = torch.stack([torch.tanh(t(e[:, i])) for i, t in enumerate(self.transforms)], dim=1)
            fused = gated = (z.unsqueeze(-1) * h).sum(1)
            contributed = mask & (z > 0)
        else:
            w = self.weights[None, :] * mask
            fused = (w.unsqueeze(-1) * e).sum(1) / w.sum(1, keepdim=True).clamp(min=1e-12)
            contributed = w > 0
        if self.normalize:
            fused = F.normalize(fused, dim=-1)
        logit = None
        if self.hparams["head"] == "similarity":
            both = mask.all(dim=1)
            cos = F.cosine_similarity(e[:, 0], e[:, 1], dim=-1)
            logit = torch.where(both, self.scale * cos + self.bias, torch.zeros_like(cos))
        elif self.hparams["head"] == "classifier":
            logit = self._classify(e, contributed, gated)
        return FusionOutput(fused, logit, contributed)

    def _classify(self, e: torch.Tensor, contributed: torch.Tensor, gated: torch.Tensor | None) -> torch.Tensor:
        if gated is not None:
            return self.head_logits(self.classifiers[0](gated))
        if self.task == "match":  # one unit: average the per-modality logits
            logits = torch.stack([c(e[:, i]).squeeze(-1) for i, c in enumerate(self.classifiers)], dim=1)  # [B, M]
            w = self.weights[None, :] * contributed
            return (w * logits).sum(1) / w.sum(1).clamp(min=1e-12)
        # decision level: the mean of the present modalities' class probabilities, as log-probabilities
        log_probs = torch.stack([F.log_softmax(c(e[:, i]), dim=-1) for i, c in enumerate(self.classifiers)], dim=1)
        w = self.weights[None, :] * contributed  # [B, M]
        # A row with nothing contributing gets equal weights here (finite gradients; base.forward answers
        # uniform for it): a logsumexp over nothing but -inf has a NaN gradient, which would poison training.
        w = torch.where(contributed.any(1, keepdim=True), w, torch.ones_like(w))
        log_w = torch.log(w / w.sum(1, keepdim=True).clamp(min=1e-12)).unsqueeze(-1)  # -inf for absent ones
        return torch.logsumexp(log_probs + log_w, dim=1)
