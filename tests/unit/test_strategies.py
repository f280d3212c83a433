"""Every fusion strategy honours one contract: shapes, masks, all-absent rows, batch invariance."""
from __future__ import annotations

import pytest
import torch

from mmfuse.serving.strategies import FusionBatch, build, load_head, save_head
from mmfuse.serving.strategies.blocks import GatedCrossAttention

D, WI, WT, TI, TT = 16, 12, 10, 9, 7
CASES = {
    "late": ("late", {}),
    "late-gmu": ("late", {"gate": "gmu", "head": "similarity"}),
    "early": ("early", {"hidden": 24}),
    "hybrid": ("hybrid", {"widths": [WI, WT], "dim": 16, "heads": 2, "layers": 2}),
    "attention": ("attention", {"image_width": WI, "text_width": WT, "dim": 16, "heads": 2, "layers": 2,
                                "image_tokens": TI}),
    "attention-pool": ("attention", {"image_width": WI, "text_width": WT, "dim": 16, "heads": 2, "layers": 1,
                                     "readout": "eot+pool", "null_key": True}),
    "attention-llava": ("attention", {"image_width": WI, "text_width": WT, "dim": 16, "heads": 2, "layers": 2,
                                      "projector": "llava"}),
}


def make_batch(rows: int = 6, seed: int = 0) -> FusionBatch:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, TT + 1, (rows,), generator=g)
    mask = torch.ones(rows, 2, dtype=torch.bool)
    mask[1, 0] = mask[2, 1] = False
    mask[3] = False  # nothing present
    return FusionBatch(
        embeddings=torch.nn.functional.normalize(torch.randn(rows, 2, D, generator=g), dim=-1),
        mask=mask,
        sequences=[torch.randn(rows, TI, WI, generator=g), torch.randn(rows, TT, WT, generator=g)],
        sequence_masks=[torch.ones(rows, TI, dtype=torch.bool), torch.arange(TT)[None, :] < lengths[:, None]],
    )


def rows_of(batch: FusionBatch, index) -> FusionBatch:
    return FusionBatch(batch.embeddings[index], batch.mask[index], [s[index] for s in batch.sequences],
                       [m[index] for m in batch.sequence_masks])


@pytest.fixture(params=list(CASES))
def strategy(request):
    name, options = CASES[request.param]
    torch.manual_seed(1)
    module = build(name, ("IMAGE", "TEXT"), D, **options).eval()
    # Open the gates, so that the image really reaches the text stream in these tests.
    for n, p in module.named_parameters():
        if "alpha" in n:
            p.data.fill_(0.7)
    return module


def test_shapes_and_no_nan(strategy):
    batch = make_batch()
    with torch.no_grad():
        out = strategy(batch)
    assert out.fused.shape == (6, D)
    assert torch.isfinite(out.fused).all()
    assert out.contributed.shape == (6, 2)
    assert (out.contributed <= batch.mask).all()
    if strategy.has_head:
        assert out.logit.shape == (6,) and torch.isfinite(out.logit).all()


def test_all_absent_row_is_defined(strategy):
    with torch.no_grad():
        out = strategy(make_batch())
    assert not out.fused[3].any()
    assert not out.contributed[3].any()
    if strategy.has_head:
        assert out.logit[3] == 0  # score 0.5: undecided


def test_masked_modality_content_does_not_matter(strategy):
    batch = make_batch()
    changed = make_batch()
    changed.embeddings[1, 0] = 100.0
    changed.sequences[0][1] = float("nan")  # even NaN in a masked image
    changed.embeddings[2, 1] = -5.0
    changed.sequences[1][2] = 7.0
    with torch.no_grad():
        a, b = strategy(batch), strategy(changed)
    torch.testing.assert_close(a.fused, b.fused)
    if strategy.has_head:
        torch.testing.assert_close(a.logit, b.logit)


def test_batch_invariance(strategy):
    batch = make_batch(rows=6, seed=3)
    with torch.no_grad():
        whole = strategy(batch)
        for i in range(6):
            alone = strategy(rows_of(batch, slice(i, i + 1)))
            torch.testing.assert_close(alone.fused[0], whole.fused[i], atol=1e-5, rtol=1e-5)
            if strategy.has_head:
                torch.testing.assert_close(alone.logit[0], whole.logit[i], atol=1e-5, rtol=1e-5)


def test_head_roundtrip(strategy, tmp_path):
    save_head(strategy, tmp_path, extra={"training": {"seed": 1}})
    loaded, description = load_head(tmp_path)
    assert description["strategy"] == strategy.name and description["training"] == {"seed": 1}
    batch = make_batch()
    with torch.no_grad():
        torch.testing.assert_close(loaded(batch).fused, strategy(batch).fused)
    assert not list(tmp_path.glob("*.pt")) and not list(tmp_path.glob("*.pkl"))


def test_untrained_gated_cross_attention_is_the_identity():
    block = GatedCrossAttention(16, 2)
    x, kv = torch.randn(3, 5, 16), torch.randn(3, 4, 16)
    torch.testing.assert_close(block(x, kv, torch.ones(3, 4, dtype=torch.bool)), x)


def test_unknown_strategy_and_bad_options_are_refused():
    with pytest.raises(KeyError, match="unknown fusion strategy"):
        build("magic", ("IMAGE", "TEXT"), D)
    with pytest.raises(ValueError, match="projector"):
        build("attention", ("IMAGE", "TEXT"), D, projector="perceiver")
    with pytest.raises(ValueError, match="weights"):
        build("late", ("IMAGE", "TEXT"), D, weights=[1.0])
