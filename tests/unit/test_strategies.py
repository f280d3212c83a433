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
CASES.update({"late/whiten": ("late", {"whiten": True}), "early/whiten": ("early", {"hidden": 24, "whiten": True})})
CLASSES = ["cat", "dog", "bird"]
CASES.update({f"{name}/classify": (kind, {**options, "task": "classify", "classes": CLASSES,
                                          **({"head": "classifier"} if kind == "late" else {})})
              for name, (kind, options) in list(CASES.items())})


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
        assert out.logit.shape == ((6,) if strategy.task == "match" else (6, len(CLASSES)))
        assert torch.isfinite(out.logit).all()


def test_all_absent_row_is_defined(strategy):
    with torch.no_grad():
        out = strategy(make_batch())
    assert not out.fused[3].any()
    assert not out.contributed[3].any()
    if strategy.has_head:
        assert not out.logit[3].any()  # score 0.5, uniform class probabilities: undecided


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
        a, b = loaded(batch), strategy(batch)
    torch.testing.assert_close(a.fused, b.fused)
    if strategy.has_head:
        torch.testing.assert_close(a.logit, b.logit)
    assert (loaded.task, loaded.classes) == (strategy.task, strategy.classes)
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


def test_decision_level_late_fusion_averages_the_present_modalities():
    """Late + classifier on classify: the class probabilities are the mean of the present modalities' own
    classifiers' probabilities; with one modality absent, exactly the other one's."""
    torch.manual_seed(0)
    module = build("late", ("IMAGE", "TEXT"), D, head="classifier", task="classify", classes=CLASSES).eval()
    batch = make_batch()
    with torch.no_grad():
        probs = torch.softmax(module(batch).logit, dim=-1)
        own = [torch.softmax(c(batch.embeddings[:, i]), dim=-1) for i, c in enumerate(module.classifiers)]
    torch.testing.assert_close(probs[0], (own[0][0] + own[1][0]) / 2)
    torch.testing.assert_close(probs[1], own[1][1])  # no image: the text's classifier alone
    torch.testing.assert_close(probs[2], own[0][2])  # no text: the image's
    torch.testing.assert_close(probs[3], torch.full((3,), 1 / 3))  # nothing: uniform


def test_task_and_classes_are_checked():
    with pytest.raises(ValueError, match="two distinct"):
        build("early", ("IMAGE", "TEXT"), D, task="classify", classes=["a", "a"])
    with pytest.raises(ValueError, match="task must be"):
        build("early", ("IMAGE", "TEXT"), D, task="regress")
    with pytest.raises(ValueError, match="similarity head scores a match"):
        build("late", ("IMAGE", "TEXT"), D, head="similarity", task="classify", classes=CLASSES)


def test_whitening_maps_the_training_rows_to_identity_covariance():
    """``whiten``: (e - input_mean) @ input_whiten has (about) the identity covariance on the rows it was set from,
    even for an ill-conditioned modality (variances 1e-8 .. 1, as a CLIP text tower gives)."""
    g = torch.Generator().manual_seed(0)
    basis = torch.linalg.qr(torch.randn(D, D, generator=g))[0]
    scales = torch.logspace(-4, 0, D)
    image = torch.randn(4000, D, generator=g) @ torch.diag(scales) @ basis.T + 3.0
    text = torch.randn(4000, D, generator=g)
    module = build("late", ("IMAGE", "TEXT"), D, head="classifier", task="classify", classes=CLASSES, whiten=True)
    present = torch.ones(4000, 2, dtype=torch.bool)
    present[:10, 1] = False  # absent rows do not count
    module.set_input_statistics(torch.stack([image, text], 1), present, shrinkage=0.0)
    white = (image - module.input_mean[0]) @ module.input_whiten[0]
    torch.testing.assert_close(torch.cov(white.T), torch.eye(D), atol=2e-3, rtol=0)
    assert module.input_mean[0].sub(3.0).abs().max() < 0.05
    # the buffers travel with the head, and a head without whiten has none
    assert {"input_mean", "input_whiten"} <= set(module.state_dict())
    assert "input_mean" not in build("late", ("IMAGE", "TEXT"), D).state_dict()
    with pytest.raises(ValueError, match="without whiten"):
        build("early", ("IMAGE", "TEXT"), D).set_input_statistics(torch.zeros(3, 2, D), torch.ones(3, 2))


@pytest.mark.parametrize("kind, options", [("late", {"head": "classifier"}), ("late", {"head": "classifier", "whiten": True}),
                                           ("late", {"head": "classifier", "gate": "gmu"}), ("early", {})])
def test_training_gradients_stay_finite_with_a_row_that_has_nothing(kind, options):
    """Modality dropout leaves rows with nothing present; they must not turn the gradients into NaN (the
    decision-level average of late fusion did: a logsumexp over nothing but -inf)."""
    torch.manual_seed(0)
    module = build(kind, ("IMAGE", "TEXT"), D, task="classify", classes=CLASSES, **options).train()
    batch = make_batch()
    logit = module(batch).logit
    some = batch.mask.any(1)
    loss = torch.nn.functional.cross_entropy(logit[some], torch.tensor([0, 1, 2, 0, 1, 2])[some])
    loss.backward()
    for name, p in module.named_parameters():
        assert p.grad is None or torch.isfinite(p.grad).all(), name
