"""The torch side of the open_clip towers: the speed-ups the encoders apply to open_clip's modules, and the text
tower's forward pass with trimming. torch is imported inside the functions: importing this module loads nothing."""
from __future__ import annotations

import functools


def patch_embedding_as_matmul(visual) -> bool:
    """Replace the vision tower's patch embedding (a Conv2d whose kernel is its stride) by one matrix product.

    Same arithmetic (each output is the dot product of a flattened patch with a flattened filter), but CPU
    convolution kernels handle this 32x32-stride case far below the matmul rate: measured on ViT-B-32 in bf16,
    one thread, batch 8: 10-12 ms as a convolution, 4.8 ms as a product (3 % of the whole tower).
    Returns whether it was replaced (other stems are left as they are).
    """
    import torch

    conv = getattr(visual, "conv1", None)
    if not (isinstance(conv, torch.nn.Conv2d) and conv.kernel_size == conv.stride and conv.groups == 1
            and tuple(conv.padding) == (0, 0) and tuple(conv.dilation) == (1, 1)):
        return False
    visual.conv1 = _patch_embedding_type()(conv)
    return True


@functools.cache
def _patch_embedding_type():
    """The module class, made on first use: this file does not import torch at import time."""
    import torch

    class PatchEmbedding(torch.nn.Module):
        """[B,C,H,W] -> [B,out,H/p,W/p], as the Conv2d it replaces (kernel = stride = p, no padding)."""

        def __init__(self, conv: torch.nn.Conv2d):
            super().__init__()
            self.out_channels = conv.out_channels
            self.patch = tuple(conv.kernel_size)
            # [C*ph*pw, out]: the filters flattened in the order a patch is flattened below (channel, row, column).
            self.register_buffer("weight", conv.weight.detach().reshape(conv.out_channels, -1).t().contiguous())
            self.register_buffer("bias", None if conv.bias is None else conv.bias.detach().clone())

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            b, c, h, w = x.shape
            ph, pw = self.patch
            gh, gw = h // ph, w // pw
            patches = x[:, :, : gh * ph, : gw * pw].reshape(b, c, gh, ph, gw, pw)
            patches = patches.permute(0, 2, 4, 1, 3, 5).reshape(b, gh * gw, c * ph * pw)
            y = patches @ self.weight.to(x.dtype)
            if self.bias is not None:
                y = y + self.bias.to(x.dtype)
            return y.permute(0, 2, 1).view(b, self.out_channels, gh, gw)  # the conv's layout, without a copy

    return PatchEmbedding


def run_sequence_first(model) -> bool:
    """Run open_clip's text transformer sequence-first ([L,B,D]) inside, as its batch_first=False mode does.

    With a causal mask, nn.MultiheadAttention cannot take its fused inference path; batch-first, it then
    transposes its input and its input projection runs on a non-contiguous [L,B,D] view, which torch's
    matmul cannot fold into one product: in bf16 it copies the weight once per caption (measured on
    ViT-B-32, one thread, 16 short captions: 298 ms -> 72 ms). Sequence-first, the transformer transposes
    once, contiguously, and every projection is one matrix product. The arithmetic is the same, up to
    float rounding (tested). Returns whether it was switched.
    """
    import torch

    transformer = getattr(model, "transformer", None)
    blocks = getattr(transformer, "resblocks", None)
    if blocks is None or not getattr(transformer, "batch_first", False):
        return False
    if not all(isinstance(getattr(b, "attn", None), torch.nn.MultiheadAttention) for b in blocks):
        return False
    transformer.batch_first = False
    for block in blocks:
        block.attn.batch_first = False
    return True


def can_trim(model) -> bool:
    """Trimming is exact for open_clip's CLIP text tower: causal mask and pooling at the EOT (argmax) token."""
    return (hasattr(model, "token_embedding") and getattr(model, "attn_mask", None) is not None
            and getattr(model, "text_pool_type", "argmax") == "argmax")


def encode_text(model, text, trim: bool = True):
    """(pooled projected features, final-layer token sequence) of open_clip's text tower.

    For the CLIP class with a causal mask and EOT (argmax) pooling, the sequence is cut at the
    longest caption in the batch: positions after a caption's EOT token never influence it under
    the causal mask, so the result equals the padded computation (tests check it).
    """
    import torch
    from open_clip.transformer import text_global_pool

    if not hasattr(model, "token_embedding"):  # CustomTextCLIP: the tower is a module of its own
        tower = model.text
        previous = getattr(tower, "output_tokens", False)
        tower.output_tokens = True
        try:
            pooled, sequence = tower(text)
        finally:
            tower.output_tokens = previous
        return pooled, sequence
    attn_mask = model.attn_mask
    pool_type = getattr(model, "text_pool_type", "argmax")
    if trim and can_trim(model) and text.shape[0] > 0:
        length = int(text.argmax(dim=-1).max().item()) + 1
        text = text[:, :length]
    length = text.shape[1]
    if attn_mask is not None and attn_mask.shape[-1] != length:
        # The causal mask of a shorter sequence is the top-left corner of the full one; contiguous, so that
        # the attention kernels take it as they take the full mask.
        attn_mask = attn_mask[:length, :length].contiguous()
    cast_dtype = model.transformer.get_cast_dtype()
    x = model.token_embedding(text).to(cast_dtype)
    x = x + model.positional_embedding[:length].to(cast_dtype)
    x = model.transformer(x, attn_mask=attn_mask)
    sequence = model.ln_final(x)
    pooled = text_global_pool(sequence, text, pool_type, eos_token_id=getattr(model, "text_eos_id", None))
    projection = model.text_projection
    if projection is not None:
        pooled = projection(pooled) if isinstance(projection, torch.nn.Linear) else pooled @ projection
    return pooled, sequence
