"""Fusion strategies as torch modules with one contract (no Triton import).

Every strategy takes a :class:`FusionBatch` (pooled embeddings [B,M,D], their presence mask
[B,M], and per modality an optional token sequence [B,T,W] with its padding mask [B,T]) and
returns a :class:`FusionOutput` (FUSED [B,F], an optional match logit [B], which modalities
contributed [B,M]). A missing modality is masked, never zero-filled silently; a row with nothing
present gives zeros and score 0.5, never NaN; a row's result never depends on other rows.

=========  ==========================================================================
late       masked weighted mean (fixed weights) or a learned per-sample gate (GMU);
           task head: a logistic on the image-text cosine (CLIP-style decision)
early      concatenation of the embeddings (absent slot zero-filled) and presence flags -> MLP
hybrid     a small shared transformer over both token sequences with modality-type
           embeddings and a padding/absence mask, pooled from a [CLS] token
attention  Flamingo-style: text tokens query image tokens through tanh-gated cross-attention
           (gates start at 0: an untrained block is the identity), then text self-attention;
           or ``projector: llava``: image tokens projected into the text stream
=========  ==========================================================================
"""
from __future__ import annotations

from .base import STRATEGIES, FusionBatch, FusionOutput, FusionStrategy, build, load_head, save_head  # noqa: F401
