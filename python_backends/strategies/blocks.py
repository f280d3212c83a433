"""Transformer pieces shared by the token-level strategies (padding masks: True = valid token)."""
from __future__ import annotations

import torch
from torch import nn


def feed_forward(d: int, mult: int = 4) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d, mult * d), nn.GELU(), nn.Linear(mult * d, d))


def trim(x: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop trailing positions that no row uses (exact: they are masked anyway)."""
    used = valid.any(dim=0).nonzero()
    length = int(used.max().item()) + 1 if used.numel() else 1
    return x[:, :length], valid[:, :length]


class SelfAttentionBlock(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.ff = feed_forward(d)

    def forward(self, x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        # Rows with no valid token would give NaN: let them attend to everything, then discard.
        any_valid = valid.any(dim=1, keepdim=True)
        pad = ~(valid | ~any_valid)
        h = self.ln1(x)
        x = x + self.attn(h, h, h, key_padding_mask=pad, need_weights=False)[0]
        return x + self.ff(self.ln2(x))


class GatedCrossAttention(nn.Module):
    """Flamingo's gated xattn-dense: tanh gates start at 0, so an untrained block is the identity."""

    def __init__(self, d: int, heads: int):
        super().__init__()
        self.ln_q, self.ln_ff = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.ff = feed_forward(d)
        self.alpha_attn = nn.Parameter(torch.zeros(1))
        self.alpha_ff = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor, kv: torch.Tensor, kv_valid: torch.Tensor) -> torch.Tensor:
        has_kv = kv_valid.any(dim=1)  # rows whose image is absent: the block is skipped
        pad = ~(kv_valid | ~has_kv[:, None])
        keep = has_kv[:, None, None].to(x.dtype)
        a = self.attn(self.ln_q(x), kv, kv, key_padding_mask=pad, need_weights=False)[0]
        self.last_read = a  # what the text read from the image, before the gate (training losses use it)
        x = x + torch.tanh(self.alpha_attn) * a * keep
        return x + torch.tanh(self.alpha_ff) * self.ff(self.ln_ff(x)) * keep
