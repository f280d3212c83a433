"""Fusion strategies as torch modules with one contract (no Triton import).

Every strategy takes a :class:`FusionBatch` (pooled embeddings [B,M,D], their presence mask
[B,M], and per modality an optional token sequence [B,T,W] with its padding mask [B,T]) and
returns a :class:`FusionOutput` (FUSED [B,F], an optional task logit, which modalities contributed
[B,M]). Tasks: ``match`` (one logit [B]: SCORE) and ``classify`` (logits [B,C] over named classes:
PROBS, LABEL). A missing modality is masked, never zero-filled silently; a row with nothing present
gives zeros, score 0.5 and uniform class probabilities, never NaN; a row's result never depends on
other rows.

=========  ==========================================================================
late       masked weighted mean (fixed weights) or a learned per-sample gate (GMU);
           task heads: a logistic on the image-text cosine (match), or per-modality
           classifiers whose probabilities are averaged (decision-level fusion)
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
