"""mmfuse.serving.image_preprocess: encoded bytes -> exactly open_clip's own preprocessing.

The reference is open_clip itself: ``create_model_and_transforms(name, pretrained=tag, load_weights=False)``
gives the preprocessing config open_clip attaches to the model and its val transform. Two things keep that
offline and cheap: open_clip 3.3.0 resolves (downloads) a tag's checkpoint *before* it looks at
``load_weights=False`` and then discards the path, so the download is replaced by a path that is never
opened; and the model is built on the meta device, so even ViT-L weights take no memory or time.
"""
from __future__ import annotations

import io
import struct
import warnings
import zlib
from contextlib import contextmanager
from dataclasses import asdict
from unittest import mock

import numpy as np
import pytest
from PIL import Image, ImageFile

from mmfuse.serving.image_preprocess import ImageLimits, ImagePreprocessor
from mmfuse.serving.openclip_models import ClipSpec, preprocess_config
from mmfuse.serving.params import Params
from tests.conftest import encode
from tests.unit.conftest import SHIPPED_MODEL, TINY, bytes_column, context_for, decode_column, load_model_config

OUTPUTS = frozenset({"PIXELS", "VALID", "STATUS"})
FORMATS = ["JPEG", "PNG", "WEBP", "BMP", "GIF"]
PHOTOS = ["astronaut", "coffee", "chelsea"]
# (model_name, pretrained tag): the shipped tiny model, ViT-B-32 with two tags, and two models whose
# preprocessing differs from the CLIP default (SigLIP: mean/std 0.5 + squash; CLIPA: ImageNet mean/std,
# bilinear, squash). All build offline (SigLIP's timm tower is created without its pretrained weights).
CONFIG_MODELS = [
    (TINY, ""),
    ("ViT-B-32", "openai"),
    ("ViT-B-32", "laion2b_s34b_b79k"),
    ("ViT-B-16-SigLIP", "webli"),
    ("ViT-L-14-CLIPA", "datacomp1b"),
]
PIXEL_MODELS = [(TINY, ""), ("ViT-B-32", "openai"), ("ViT-B-16-SigLIP", "webli"), ("ViT-L-14-CLIPA", "datacomp1b")]


def model_id(model) -> str:
    return f"{model[0]}:{model[1] or 'none'}"


@contextmanager
def no_downloads():
    """Any attempt of open_clip to fetch weights fails the test."""
    import open_clip

    def refuse(*args, **kwargs):
        raise AssertionError("a download was attempted")

    with mock.patch.object(open_clip.factory, "download_pretrained", refuse), \
            mock.patch.object(open_clip.factory, "download_pretrained_from_hf", refuse), \
            mock.patch.object(open_clip.pretrained, "download_pretrained_from_url", refuse):
        yield


@pytest.fixture(scope="module")
def open_clip_own(open_clip_tiny):
    """(model, tag) -> (preprocess cfg dict that create_model attaches, open_clip's val transform)."""
    import torch

    cache = {}

    def never_opened(cfg, cache_dir=None, **kwargs):
        assert isinstance(cfg, dict) and cfg, "open_clip resolved the tag to a pretrained cfg"
        return "/nonexistent/discarded-because-load_weights-is-false.bin"

    def get(model_name: str, pretrained: str):
        if (model_name, pretrained) not in cache:
            with mock.patch.object(open_clip_tiny.factory, "download_pretrained", never_opened), \
                    warnings.catch_warnings(), torch.device("meta"):
                warnings.simplefilter("ignore", UserWarning)  # QuickGELU mismatch: irrelevant to pixels
                model, _, val = open_clip_tiny.create_model_and_transforms(
                    model_name, pretrained=pretrained or None, load_weights=False, device="meta")
            cache[model_name, pretrained] = (dict(model.visual.preprocess_cfg), val)
        return cache[model_name, pretrained]

    return get


@pytest.fixture(scope="module")
def preprocessors(open_clip_tiny):
    """(model, tag, limits, threads) -> an ImagePreprocessor, built without any download."""
    cache = {}

    def get(model_name: str = TINY, pretrained: str = "", limits: ImageLimits = ImageLimits(), threads: int = 1):
        key = (model_name, pretrained, limits, threads)
        if key not in cache:
            with no_downloads():
                cache[key] = ImagePreprocessor(ClipSpec(model_name, pretrained), limits, decode_threads=threads)
        return cache[key]

    yield get
    for handler in cache.values():
        handler.close()


@pytest.fixture(scope="module")
def tiny_reference(open_clip_own):
    """open_clip's val transform of the tiny model applied to a PIL image converted to RGB."""
    _, val = open_clip_own(TINY, "")
    return lambda image: val(image.convert("RGB")).numpy()


def run(handler: ImagePreprocessor, images) -> dict[str, np.ndarray]:
    return handler({"IMAGE": bytes_column(images)}, OUTPUTS)


def pixels_of(handler: ImagePreprocessor, data: bytes) -> np.ndarray:
    out = run(handler, [data])
    assert decode_column(out["STATUS"]) == ["ok"] and out["VALID"][0, 0]
    return out["PIXELS"][0]


def decoded(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data))


def canonical(cfg) -> dict:
    """A preprocess cfg with open_clip's equivalent spellings unified (size 224 == (224, 224))."""
    from open_clip.utils import to_2tuple

    d = dict(asdict(cfg) if not isinstance(cfg, dict) else cfg)
    d["size"] = tuple(to_2tuple(d["size"]))
    d["mean"] = tuple(float(x) for x in d["mean"])
    d["std"] = tuple(float(x) for x in d["std"])
    return d


# -- the preprocessing config is open_clip's own ----------------------------------------------------------------
@pytest.mark.parametrize("model", CONFIG_MODELS, ids=model_id)
def test_preprocess_config_equals_open_clip_create_model(open_clip_own, model):
    own_cfg, _ = open_clip_own(*model)
    with no_downloads():
        ours = preprocess_config(ClipSpec(*model))
    assert canonical(ours) == canonical(own_cfg)


def test_parity_models_cover_non_default_preprocessing(open_clip_own):
    from open_clip.transform import PreprocessCfg

    default = canonical(PreprocessCfg(size=224))
    differing = {model_id(m) for m in CONFIG_MODELS if canonical(open_clip_own(*m)[0]) != default}
    assert {"ViT-B-16-SigLIP:webli", "ViT-L-14-CLIPA:datacomp1b", f"{TINY}:none"} <= differing


# -- pixels equal open_clip's val transform -------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("model", PIXEL_MODELS, ids=model_id)
def test_pixels_equal_open_clip_transform(open_clip_own, preprocessors, photos, model, fmt):
    _, val = open_clip_own(*model)
    handler = preprocessors(*model)
    images = [encode(photos[name], fmt) for name in PHOTOS]
    out = run(handler, images)
    assert out["PIXELS"].shape == (len(PHOTOS),) + tuple(handler.cfg.input_size)
    assert decode_column(out["STATUS"]) == ["ok"] * len(PHOTOS)
    for name, data, pixels in zip(PHOTOS, images, out["PIXELS"]):
        expected = val(decoded(data).convert("RGB")).numpy()
        np.testing.assert_allclose(pixels, expected, rtol=0, atol=1e-6, err_msg=f"{name} as {fmt}")


def test_tag_changes_only_the_preprocessing(preprocessors, photos):
    data = encode(photos["coffee"], "PNG")
    siglip = pixels_of(preprocessors("ViT-B-16-SigLIP", "webli"), data)
    clip = pixels_of(preprocessors("ViT-B-32", "openai"), data)
    assert siglip.shape == clip.shape == (3, 224, 224)
    assert np.abs(siglip - clip).mean() > 0.05


# -- conversions --------------------------------------------------------------------------------------------------
def test_exif_orientation_is_applied(preprocessors, tiny_reference, photos):
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: display after a 90° clockwise turn
    data = encode(photos["chelsea"], "JPEG", exif=exif.tobytes())
    upright = decoded(data).transpose(Image.Transpose.ROTATE_270)  # 90° clockwise
    pixels = pixels_of(preprocessors(), data)
    np.testing.assert_allclose(pixels, tiny_reference(upright), rtol=0, atol=1e-6)
    assert np.abs(pixels - tiny_reference(decoded(data))).mean() > 0.05  # the test can tell


@pytest.mark.parametrize("mode, fmt", [("L", "PNG"), ("L", "JPEG"), ("P", "PNG"), ("RGBA", "PNG"), ("CMYK", "JPEG")])
def test_mode_conversions(preprocessors, tiny_reference, photos, mode, fmt):
    image = Image.fromarray(photos["astronaut"])
    if mode == "RGBA":
        image.putalpha(Image.linear_gradient("L").resize(image.size))
    else:
        image = image.convert(mode)
    data = encode(image, fmt)
    assert decoded(data).mode == mode
    pixels = pixels_of(preprocessors(), data)
    np.testing.assert_allclose(pixels, tiny_reference(decoded(data)), rtol=0, atol=1e-6)
    if mode in ("CMYK", "RGBA"):  # colours survive: close to the plain RGB photo
        rgb = tiny_reference(Image.fromarray(photos["astronaut"]))
        assert np.abs(pixels - rgb).mean() < 0.1


def test_16_bit_grey_is_scaled_not_clipped(preprocessors, tiny_reference):
    gradient8 = np.tile(np.arange(256, dtype=np.uint8), (96, 1))  # 96 x 256, 0..255
    gradient16 = gradient8.astype(np.uint16) * 257  # the same picture, 0..65535
    data16 = encode(Image.fromarray(gradient16), "PNG")
    assert decoded(data16).mode.startswith("I")
    handler = preprocessors()
    pixels16 = pixels_of(handler, data16)
    pixels8 = pixels_of(handler, encode(Image.fromarray(gradient8), "PNG"))
    np.testing.assert_allclose(pixels16, pixels8, rtol=0, atol=1e-6)
    clipped = tiny_reference(decoded(data16))  # PIL's convert() clips at 255
    assert np.abs(pixels16 - clipped).mean() > 0.5  # the test can tell


def test_animated_gif_uses_the_first_frame(preprocessors, tiny_reference, photos):
    first = Image.fromarray(photos["astronaut"]).resize((128, 128))
    second = Image.fromarray(photos["coffee"]).resize((128, 128))
    buffer = io.BytesIO()
    first.save(buffer, format="GIF", save_all=True, append_images=[second], duration=100, loop=0)
    data = buffer.getvalue()
    gif = decoded(data)
    assert gif.n_frames == 2
    expected_first = tiny_reference(gif)
    gif.seek(1)
    expected_second = tiny_reference(gif)
    pixels = pixels_of(preprocessors(), data)
    np.testing.assert_allclose(pixels, expected_first, rtol=0, atol=1e-6)
    assert np.abs(pixels - expected_second).mean() > 0.05


# -- rejections ----------------------------------------------------------------------------------------------------
def png_header(width: int, height: int) -> bytes:
    """A PNG that claims width x height RGB pixels: signature, IHDR (valid CRC), IEND; no pixel data."""
    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


@pytest.fixture
def pixel_buffers_forbidden(monkeypatch):
    """Fail if any image's pixel data is loaded (that is where PIL allocates width*height)."""
    def refuse(self):
        raise AssertionError(f"pixels of a {self.size} image were loaded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", refuse)


@pytest.mark.parametrize("size", [(20000, 20000), (8000, 6000)], ids=["over-PIL-bomb-limit", "over-max_image_pixels"])
def test_pixel_bomb_rejected_from_the_header(preprocessors, pixel_buffers_forbidden, size):
    data = png_header(*size)
    with mock.patch.object(Image, "MAX_IMAGE_PIXELS", None):
        assert decoded(data).size == size  # the header is well-formed
    out = run(preprocessors(), [data])
    assert decode_column(out["STATUS"]) == ["too_large"]
    assert not out["VALID"][0, 0]


def test_pixel_limit_is_configurable(preprocessors, photos):
    handler = preprocessors(limits=ImageLimits(max_image_pixels=300 * 451))
    out = run(handler, [encode(photos["chelsea"], "PNG"), encode(photos["coffee"], "PNG")])  # 300x451, 400x600
    assert decode_column(out["STATUS"]) == ["ok", "too_large"]


def test_over_max_image_bytes(preprocessors, photos):
    data = encode(photos["astronaut"], "PNG")
    handler = preprocessors(limits=ImageLimits(max_image_bytes=len(data) - 1))
    assert decode_column(run(handler, [data])["STATUS"]) == ["too_large"]
    handler = preprocessors(limits=ImageLimits(max_image_bytes=len(data)))
    assert decode_column(run(handler, [data])["STATUS"]) == ["ok"]


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
def test_base64_and_data_uris_give_the_raw_images_pixels(preprocessors, photos, fmt):
    """What a JSON client over Triton's HTTP/REST endpoint can send: base64 text, or a data URI."""
    import base64

    raw = encode(photos["chelsea"], fmt)
    text = base64.b64encode(raw)
    mime = f"image/{fmt.lower()}".encode()
    rows = [raw, text, base64.encodebytes(raw), b"data:" + mime + b";base64," + text,
            b"DATA:" + mime + b";name=cat.img;base64," + base64.encodebytes(raw)]
    out = run(preprocessors(), rows)
    assert decode_column(out["STATUS"]) == ["ok"] * len(rows)
    for i in range(1, len(rows)):
        np.testing.assert_array_equal(out["PIXELS"][i], out["PIXELS"][0])


@pytest.mark.parametrize("data, status", [
    (b"data:image/png,not-base64", "undecodable"),
    (b"data:image/png;base64,@@not base64@@", "undecodable"),
    (b"data:text/plain;base64,aGVsbG8gd29ybGQ=", "undecodable"),  # base64 of text, not of an image
    (b"aGVsbG8gd29ybGQ=", "undecodable"),  # plain base64 of text
])
def test_text_that_is_not_an_image_stays_undecodable(preprocessors, data, status):
    assert decode_column(run(preprocessors(), [data])["STATUS"]) == [status]


def test_base64_is_bounded_by_max_image_bytes_before_decoding(preprocessors, photos):
    import base64

    raw = encode(photos["astronaut"], "PNG")
    handler = preprocessors(limits=ImageLimits(max_image_bytes=len(raw) - 1))
    assert decode_column(run(handler, [base64.b64encode(raw)])["STATUS"]) == ["too_large"]
    handler = preprocessors(limits=ImageLimits(max_image_bytes=len(raw)))
    assert decode_column(run(handler, [b"data:image/png;base64," + base64.b64encode(raw)])["STATUS"]) == ["ok"]
    tiny = preprocessors(limits=ImageLimits(max_image_bytes=1000))
    assert decode_column(run(tiny, [b"A" * 100_000])["STATUS"]) == ["too_large"]  # never decoded


@pytest.mark.parametrize("name, make, status", [
    ("empty", lambda photos: b"", "missing"),
    ("truncated-jpeg", lambda photos: encode(photos["coffee"], "JPEG")[:5000], "undecodable"),
    ("truncated-png", lambda photos: encode(photos["coffee"], "PNG")[:5000], "undecodable"),
    ("garbage", lambda photos: b"this is not an image at all" * 20, "undecodable"),
    ("png-signature-only", lambda photos: b"\x89PNG\r\n\x1a\n", "undecodable"),
])
def test_rejected_rows(preprocessors, photos, name, make, status):
    assert not ImageFile.LOAD_TRUNCATED_IMAGES
    out = run(preprocessors(), [make(photos)])
    assert decode_column(out["STATUS"]) == [status]
    assert not out["VALID"][0, 0]
    assert not out["PIXELS"].any()


def test_rows_are_isolated_in_a_batch(preprocessors, photos):
    images = [
        encode(photos["astronaut"], "JPEG"),
        b"garbage",
        b"",
        encode(photos["coffee"], "PNG"),
        encode(photos["chelsea"], "JPEG")[:3000],
        png_header(20000, 20000),
        encode(photos["chelsea"], "WEBP"),
    ]
    handler = preprocessors(threads=2)
    out = run(handler, images)
    assert decode_column(out["STATUS"]) == ["ok", "undecodable", "missing", "ok", "undecodable", "too_large", "ok"]
    np.testing.assert_array_equal(out["VALID"][:, 0], [True, False, False, True, False, False, True])
    for i, data in enumerate(images):
        alone = run(handler, [data])
        np.testing.assert_array_equal(out["PIXELS"][i], alone["PIXELS"][0], err_msg=f"row {i}")
    assert not out["PIXELS"][[1, 2, 4, 5]].any()


def test_built_from_the_repository_config(open_clip_tiny):
    params = Params.from_model_config("image_preprocess", load_model_config("image_preprocess"))
    handler = ImagePreprocessor.from_parameters(context_for("image_preprocess"), params)
    try:
        params.reject_unknown()
        assert handler.spec.model_name == SHIPPED_MODEL
        assert handler.limits == ImageLimits(max_image_bytes=16777216, max_image_pixels=40_000_000)
        assert handler.input_size == (3, 64, 64)
    finally:
        handler.close()
