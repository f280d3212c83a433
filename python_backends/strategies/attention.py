"""Attention fusion: text tokens read image tokens (Flamingo), or image tokens join the text (LLaVA)."""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from .base import FusionBatch, FusionOutput, FusionStrategy, last_valid, masked_mean, register
from .blocks import GatedCrossAttention, SelfAttentionBlock, trim


@register
class AttentionFusion(FusionStrategy):
    """hparams: image_width, text_width (token widths of the encoders), dim, heads, layers,
    projector ("flamingo" | "llava"), head (bool), image_tokens (learned image positions; 0 = none),
    readout ("eot" | "eot+pool" | "eot+mean"), null_key (a learned "nothing here" key for cross-attention), task,
    classes. Modalities: the first is the image (keys),
    the second the text (queries)."""

    name = "attention"
    needs_sequences = True

    def __init__(self, modalities, embed_dim, image_width=64, text_width=64, dim=128, heads=4, layers=2,
                 projector="flamingo", head=True, image_tokens=0, readout="eot", null_key=False, task="match",
                 classes=None, whiten=False):
        super().__init__(modalities, embed_dim, task, classes, whiten, image_width=image_width, text_width=text_width, dim=dim,
                         heads=heads, layers=layers, projector=projector, head=head, image_tokens=image_tokens,
                         readout=readout, null_key=null_key)
        if readout not in ("eot", "eot+pool", "eot+mean"):
            raise ValueError(f"attention fusion: readout must be eot, eot+pool or eot+mean, got {readout!r}")
        if len(modalities) != 2:
            raise ValueError("attention fusion takes two modalities: image (keys) and text (queries)")
        if projector not in ("flamingo", "llava"):
            raise ValueError(f"attention fusion: projector must be flamingo or llava, got {projector!r}")
        if projector == "llava":
            self.image_proj = nn.Sequential(nn.Linear(image_width, dim), nn.GELU(), nn.Linear(dim, dim))
            self.xattn = nn.ModuleList()
        else:
            self.image_proj = nn.Linear(image_width, dim)
            self.xattn = nn.ModuleList(GatedCrossAttention(dim, heads) for _ in range(layers))
        # null_key: one learned key/value beside the image tokens, so that a text token whose object
        # is not in the image can attend to "nothing" instead of to the closest patch.
        self.null_kv = nn.Parameter(torch.zeros(1, 1, dim)) if null_key else None
        # Optional learned position of each image token (image_tokens = their number, 0 = none).
        self.image_pos = nn.Parameter(torch.zeros(1, image_tokens, dim)) if image_tokens else None
        self.text_proj = nn.Linear(text_width, dim)
        self.null_text = nn.Parameter(torch.zeros(1, 1, dim))
        self.self_attn = nn.ModuleList(SelfAttentionBlock(dim, heads) for _ in range(layers))
        # readout "eot+pool" / "eot+mean": the end-of-text state plus an attention pooling (a learned
        # query) or the mean of all text states, so that verdicts formed at any token (e.g. "this named
        # object is not in the image", at either noun) reach the score directly.
        self.pool_query = nn.Parameter(torch.zeros(dim)) if readout == "eot+pool" else None
        width = dim if readout == "eot" else 2 * dim
        self.ln = nn.LayerNorm(width)
        self.out = nn.Linear(width, embed_dim)
        self.head = nn.Sequential(nn.Linear(width, dim), nn.GELU(), nn.Linear(dim, self.outputs)) if head else None

    @property
    def has_head(self) -> bool:
        return self.head is not None

    def fuse(self, batch: FusionBatch) -> FusionOutput:
        image, text = batch.sequences[0], batch.sequences[1]
        image_valid = batch.sequence_masks[0] & batch.mask[:, 0:1]
        text_valid = batch.sequence_masks[1] & batch.mask[:, 1:2]
        text, text_valid = trim(text, text_valid)
        kv = self.image_proj(image)
        if self.image_pos is not None:
            kv = kv + self.image_pos
        if self.null_kv is not None and self.hparams["projector"] == "flamingo":
            kv = torch.cat([self.null_kv.expand(kv.shape[0], 1, -1), kv], dim=1)
            image_valid = torch.cat([batch.mask[:, 0:1], image_valid], dim=1)  # only where there is an image
        x = self.text_proj(text)
        # An absent text becomes one learned null token, so image-only rows still have a stream.
        no_text = ~text_valid.any(dim=1)
        x = torch.where(no_text[:, None, None], self.null_text.expand_as(x), x)
        text_valid = text_valid.clone()
        text_valid[no_text, 0] = True
        if self.hparams["projector"] == "llava":
            images = kv.shape[1]
            x = torch.cat([kv, x], dim=1)
            valid = torch.cat([image_valid, text_valid], dim=1)
            for block in self.self_attn:
                x = block(x, valid)
            pooled = last_valid(x, valid)
            x = x[:, images:]
        else:
            for cross, block in zip(self.xattn, self.self_attn):
                x = cross(x, kv, image_valid)
                x = block(x, text_valid)
            pooled = last_valid(x, text_valid)
        if self.pool_query is not None:
            weights = (x @ self.pool_query / self.pool_query.shape[0] ** 0.5).masked_fill(~text_valid, float("-inf"))
            pooled = torch.cat([pooled, (torch.softmax(weights, dim=1).unsqueeze(-1) * x).sum(1)], dim=-1)
        elif self.hparams["readout"] == "eot+mean":
            pooled = torch.cat([pooled, masked_mean(x, text_valid)], dim=-1)
        pooled = self.ln(pooled)
        logit = self.head_logits(self.head(pooled)) if self.head is not None else None
        return FusionOutput(F.normalize(self.out(pooled), dim=-1), logit, batch.mask.clone(), x)
