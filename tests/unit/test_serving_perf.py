"""Every speed-up of the serving path keeps its outputs within tolerance.

* image preprocessing: the lookup-table tail is bit-identical to open_clip's ToTensor + Normalize for every
  preprocessing the parity tests cover; reduced-size JPEG decoding (``jpeg_draft``) is off by default, and
  when on it stays within a measured pixel tolerance and keeps the embeddings (cosine >= 0.99);
* encoders: the token sequence is computed only when asked for, and the embedding does not change;
* the patch embedding runs as one matrix product, equal to the convolution it replaces;
* text trimming and bf16 are covered in test_encoders.py (equality with the padded result; cosine >= 0.99).
"""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from mmfuse.serving.encoders import ImageEncoder, TextEncoder
from mmfuse.serving.image_preprocess import ImagePreprocessor, draft_size, split_transform
from mmfuse.serving.openclip_models import ClipSpec
from tests.conftest import encode
from tests.unit.conftest import TINY, bytes_column, cosine_rows, load_model_config, make_params

PIXEL_MODELS = [(TINY, ""), ("ViT-B-32", "openai"), ("ViT-B-16-SigLIP", "webli"), ("ViT-L-14-CLIPA", "datacomp1b")]
OUTPUTS = frozenset({"PIXELS", "VALID", "STATUS"})


def preprocessor(model=(TINY, ""), **kwargs) -> ImagePreprocessor:
    return ImagePreprocessor(ClipSpec(*model), decode_threads=1, **kwargs)


def large_photo(photos, name: str = "astronaut", scale: int = 3) -> np.ndarray:
    """A photograph upscaled so that DCT scaling has room (512 -> 1536 pixels)."""
    image = Image.fromarray(photos[name])
    return np.asarray(image.resize((image.width * scale, image.height * scale), Image.BICUBIC))


@pytest.mark.parametrize("model", PIXEL_MODELS, ids=lambda m: f"{m[0]}:{m[1] or 'none'}")
def test_lookup_table_tail_is_bit_identical(open_clip_tiny, photos, model):
    fast, whole = preprocessor(model), preprocessor(model, fast_tail=False)
    assert fast._table is not None and whole._table is None  # the fast path is the one in use
    for name, photo in photos.items():
        for fmt in ("JPEG", "PNG"):
            data = encode(photo, fmt)
            expected = whole.transform(whole.decode(data)).numpy()
            got = fast({"IMAGE": bytes_column([data])}, OUTPUTS)["PIXELS"][0]
            np.testing.assert_array_equal(got, expected, err_msg=f"{model} {name} {fmt}")


def test_a_transform_of_another_shape_runs_whole(open_clip_tiny, photos):
    from torchvision.transforms import Compose, Lambda

    handler = preprocessor()
    data = encode(photos["coffee"], "JPEG")
    expected = handler.preprocess_one(data)[0]
    handler.transform = Compose(list(handler.transform.transforms) + [Lambda(lambda x: x * 1.0)])
    assert split_transform(handler.transform) is None
    handler._geometry, handler._table = None, None
    np.testing.assert_array_equal(handler.preprocess_one(data)[0], expected)


def test_failed_rows_stay_zero_and_other_rows_exact(open_clip_tiny, photos):
    handler, whole = preprocessor(), preprocessor(fast_tail=False)
    good = encode(photos["chelsea"], "JPEG")
    out = handler({"IMAGE": bytes_column([good, good[:200], b"", good])}, OUTPUTS)
    assert out["VALID"][:, 0].tolist() == [True, False, False, True]
    assert not out["PIXELS"][[1, 2]].any()
    expected = whole.transform(whole.decode(good)).numpy()
    np.testing.assert_array_equal(out["PIXELS"][0], expected)
    np.testing.assert_array_equal(out["PIXELS"][3], expected)


# -- reduced-size JPEG decoding ------------------------------------------------------------------------------------------
def test_jpeg_draft_is_off_by_default_and_in_the_shipped_config(open_clip_tiny):
    from tests.unit.conftest import context_for, triton_args  # noqa: F401

    config = load_model_config("image_preprocess")
    assert config["parameters"].get("jpeg_draft", {}).get("string_value", "false") == "false"
    params = make_params("image_preprocess", model_name=TINY)
    assert ImagePreprocessor.from_parameters(context_for("image_preprocess"), params).jpeg_draft is False
    params = make_params("image_preprocess", model_name=TINY, jpeg_draft="true")
    handler = ImagePreprocessor.from_parameters(context_for("image_preprocess"), params)
    params.reject_unknown()
    assert handler.jpeg_draft is True


@pytest.mark.parametrize("mode, size, image, expected", [
    ("shortest", 224, (1024, 768), (299, 224)),
    ("shortest", 224, (768, 1024), (224, 299)),
    ("longest", 224, (1024, 768), (224, 168)),
    ("squash", (224, 224), (1024, 768), (224, 224)),
    ("shortest", (64, 64), (100, 50), (128, 64)),
])
def test_draft_size_covers_the_resize(mode, size, image, expected):
    assert draft_size(*image, size, mode) == expected


@pytest.mark.parametrize("model", [(TINY, ""), ("ViT-B-32", "openai"), ("ViT-B-16-SigLIP", "webli")],
                         ids=lambda m: m[0])
def test_jpeg_draft_pixels_within_tolerance(open_clip_tiny, photos, model):
    """Measured on these photographs, 1.5k pixels wide: DCT-scaled decoding changes pixels by 0.004 to 0.056 on
    average (normalised units: 1 grey level is ~0.015) and by at most 0.66 at the sharpest edge."""
    exact, draft = preprocessor(model), preprocessor(model, jpeg_draft=True)
    for name in photos:
        data = encode(large_photo(photos, name), "JPEG", quality=92)
        assert draft.decode(data).width < exact.decode(data).width  # it did decode at a reduced size
        a, b = exact.preprocess_one(data)[0], draft.preprocess_one(data)[0]
        assert a.shape == b.shape
        assert np.abs(a - b).mean() < 0.08, name
        assert np.abs(a - b).max() < 1.0, name


def test_jpeg_draft_keeps_embeddings(open_clip_tiny, photos):
    encoder = ImageEncoder(ClipSpec(TINY, allow_random_init=True, seed=7))
    exact, draft = preprocessor(), preprocessor(jpeg_draft=True)
    column = bytes_column([encode(large_photo(photos, name), "JPEG") for name in photos])
    a = encoder({"PIXELS": exact({"IMAGE": column}, OUTPUTS)["PIXELS"]}, frozenset({"EMBEDDING"}))["EMBEDDING"]
    b = encoder({"PIXELS": draft({"IMAGE": column}, OUTPUTS)["PIXELS"]}, frozenset({"EMBEDDING"}))["EMBEDDING"]
    assert cosine_rows(a, b).min() >= 0.99


def test_jpeg_draft_leaves_other_formats_and_small_jpegs_exact(open_clip_tiny, photos):
    exact, draft = preprocessor(("ViT-B-32", "openai")), preprocessor(("ViT-B-32", "openai"), jpeg_draft=True)
    for data in (encode(large_photo(photos), "PNG"), encode(photos["chelsea"], "JPEG")):  # chelsea: 451x300
        np.testing.assert_array_equal(draft.preprocess_one(data)[0], exact.preprocess_one(data)[0])


def test_jpeg_draft_follows_exif_orientation(open_clip_tiny, photos):
    """A JPEG stored sideways (EXIF orientation 6) is drafted for its upright shape, then turned."""
    exact, draft = preprocessor(("ViT-B-32", "openai")), preprocessor(("ViT-B-32", "openai"), jpeg_draft=True)
    image = Image.fromarray(large_photo(photos, "coffee"))  # 1800 x 1200, landscape as stored
    exif = Image.Exif()
    exif[0x0112] = 6
    out = io.BytesIO()
    image.save(out, format="JPEG", exif=exif.tobytes(), quality=92)
    data = out.getvalue()
    upright = exact.decode(data)
    drafted = draft.decode(data)
    assert upright.size == (1200, 1800) and drafted.height > drafted.width  # turned, as the exact path
    assert min(drafted.size) >= 224 and drafted.width < upright.width
    a, b = exact.preprocess_one(data)[0], draft.preprocess_one(data)[0]
    assert np.abs(a - b).mean() < 0.08


# -- encoders: only what is asked for ---------------------------------------------------------------------------------
def test_sequence_is_computed_only_on_request(open_clip_tiny, tiny_tokenizer):
    spec = ClipSpec(TINY, allow_random_init=True, seed=3)
    pixels = np.random.default_rng(0).standard_normal((3, 3, 64, 64)).astype(np.float32)
    image = ImageEncoder(spec)
    pooled, sequence = image.encode(pixels, sequence=False)
    assert sequence is None
    pooled_too, sequence = image.encode(pixels, sequence=True)
    np.testing.assert_array_equal(pooled, pooled_too)
    assert sequence.shape == (3,) + image.sequence_shape
    text = TextEncoder(spec)
    tokens = tiny_tokenizer(["a cat", "two dogs on a red sofa"]).numpy()
    pooled, states = text.encode(tokens, sequence=False)
    assert states is None
    np.testing.assert_array_equal(pooled, text.encode(tokens)[0])


def test_all_valid_rows_skip_the_copy_and_give_the_same_embeddings(open_clip_tiny):
    encoder = ImageEncoder(ClipSpec(TINY, allow_random_init=True, seed=3))
    pixels = np.random.default_rng(1).standard_normal((4, 3, 64, 64)).astype(np.float32)
    embed = frozenset({"EMBEDDING"})
    without = encoder({"PIXELS": pixels}, embed)["EMBEDDING"]
    with_valid = encoder({"PIXELS": pixels, "VALID": np.ones((4, 1), bool)}, embed)["EMBEDDING"]
    np.testing.assert_array_equal(without, with_valid)


# -- patch embedding as one matrix product -------------------------------------------------------------------------
@pytest.mark.parametrize("channels, width, patch, size, bias", [
    (3, 64, 16, (64, 64), False),     # mmfuse-tiny
    (3, 768, 32, (224, 224), False),  # ViT-B-32
    (3, 32, 8, (70, 45), True),       # sizes that are not multiples of the patch: the conv drops the remainder
])
def test_patch_embedding_equals_the_convolution(channels, width, patch, size, bias):
    import torch

    from mmfuse.serving.encoders import _patch_embedding_type

    torch.manual_seed(0)
    conv = torch.nn.Conv2d(channels, width, kernel_size=patch, stride=patch, bias=bias).eval()
    x = torch.randn(3, channels, *size)
    fast = _patch_embedding_type()(conv)
    with torch.no_grad():
        expected, got = conv(x), fast(x)
        assert got.shape == expected.shape
        torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-5)
        got16 = fast.to(torch.bfloat16)(x.to(torch.bfloat16)).float()
        cos = torch.nn.functional.cosine_similarity(got16.flatten(1), expected.flatten(1))
        assert cos.min() > 0.999


def test_image_encoder_uses_the_matmul_patch_embedding(open_clip_tiny):
    encoder = ImageEncoder(ClipSpec(TINY, allow_random_init=True, seed=3))
    assert encoder.fast_patch_embedding and type(encoder.visual.conv1).__name__ == "PatchEmbedding"
    # (test_encoders.py checks the embeddings against open_clip's own model at cosine >= 0.9999)


def test_overlapping_or_padded_stems_are_left_alone():
    import torch

    from mmfuse.serving.encoders import patch_embedding_as_matmul

    class Stem(torch.nn.Module):
        def __init__(self, conv):
            super().__init__()
            self.conv1 = conv

    for conv in (torch.nn.Conv2d(3, 8, 4, stride=2), torch.nn.Conv2d(3, 8, 4, stride=4, padding=1),
                 torch.nn.Conv2d(3, 8, 4, stride=4, dilation=2)):
        stem = Stem(conv)
        assert not patch_embedding_as_matmul(stem) and stem.conv1 is conv
    assert not patch_embedding_as_matmul(object())


# -- text transformer run sequence-first ---------------------------------------------------------------------------
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_sequence_first_text_transformer_gives_the_same_outputs(open_clip_tiny, tiny_tokenizer, precision):
    import torch

    from mmfuse.serving.encoders import encode_text
    from mmfuse.serving.openclip_models import load_clip

    spec = ClipSpec(TINY, allow_random_init=True, seed=5, precision=precision)
    encoder = TextEncoder(spec)
    assert encoder.sequence_first and not encoder.model.transformer.batch_first
    reference = load_clip(spec)  # the same seeded weights, batch-first as open_clip builds it
    assert reference.transformer.batch_first
    tokens = tiny_tokenizer(["a cat", "two dogs playing on a red sofa in the sun", "x"]).numpy()
    got = encoder({"TOKENS": tokens}, frozenset({"EMBEDDING", "SEQUENCE"}))
    with torch.inference_mode():
        pooled, sequence = encode_text(reference, torch.from_numpy(tokens), trim=True)
        pooled = torch.nn.functional.normalize(pooled.float(), dim=-1).numpy()
    length = sequence.shape[1]
    real = (np.arange(length)[None, :] <= tokens.argmax(axis=1)[:, None])[:, :, None]
    expected_sequence = sequence.float().numpy() * real
    if precision == "fp32":  # the same products, blocked differently: equal to float rounding
        np.testing.assert_allclose(got["EMBEDDING"], pooled, atol=1e-5)
        np.testing.assert_allclose(got["SEQUENCE"][:, :length], expected_sequence, atol=1e-4)
    else:
        assert cosine_rows(got["EMBEDDING"], pooled).min() >= 0.9999
        keep = real.reshape(-1)  # padding rows are zeros in both
        assert cosine_rows(got["SEQUENCE"][:, :length].reshape(-1, sequence.shape[2])[keep],
                           expected_sequence.reshape(-1, sequence.shape[2])[keep]).min() >= 0.999
