"""Input limits found by the bad-input corpus (tests/corpus.py), checked without a server.

* A thin strip within max_image_pixels whose resize to the model's input would not be: rejected from the
  header, before any pixel is decoded.
* Formats outside DECODED_FORMATS (PostScript, which Pillow would hand to Ghostscript) never reach a decoder.
* open_clip's tokenizer memoises every distinct word: the cache is bounded, and tokens are unchanged by it.
"""
from __future__ import annotations

import random
import string

import numpy as np
import pytest
from PIL import EpsImagePlugin, ImageFile

from mmfuse.serving import text_preprocess
from mmfuse.serving.image_preprocess import ImageLimits, ImageRejected, decode_image, resized_pixels
from tests.corpus import eps_document, png_bomb


def test_resized_pixels_follows_open_clip_resize_modes():
    assert resized_pixels(1, 40000, 64) == pytest.approx(64 * 64 * 40000)  # shortest edge -> 64
    assert resized_pixels(640, 480, 224) == pytest.approx(224 * 224 * 640 / 480)
    assert resized_pixels(1, 40000, 64, "longest") == pytest.approx(40000 * (64 / 40000) ** 2)
    assert resized_pixels(1, 40000, (64, 32), "squash") == 64 * 32


def test_a_thin_strip_is_rejected_from_its_header(monkeypatch):
    def refuse(self):
        raise AssertionError(f"pixels of a {self.size} image were loaded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", refuse)
    with pytest.raises(ImageRejected) as info:
        decode_image(png_bomb(1, 40000), ImageLimits(), resize_to=64)
    assert info.value.status == "too_large" and "aspect ratio" in str(info.value)


def test_a_strip_within_the_limit_is_decoded():
    image = decode_image(png_bomb(3, 2000), ImageLimits(), resize_to=64)  # 64 x 42667 after the resize
    assert image.size == (3, 2000)
    with pytest.raises(ImageRejected):
        decode_image(png_bomb(3, 2000), ImageLimits(max_image_pixels=64 * 64 * 600), resize_to=64)


def test_postscript_never_reaches_a_decoder(monkeypatch):
    def refuse(self):
        raise AssertionError("the EPS plugin (Ghostscript) was asked to open the image")

    monkeypatch.setattr(EpsImagePlugin.EpsImageFile, "_open", refuse)
    with pytest.raises(ImageRejected) as info:
        decode_image(eps_document())
    assert info.value.status == "undecodable"


def test_the_tokenizer_cache_is_bounded_and_tokens_are_unchanged(monkeypatch):
    import open_clip

    from mmfuse.serving.openclip_models import ClipSpec

    monkeypatch.setattr(text_preprocess, "MAX_TOKENIZER_CACHE", 500)
    handler = text_preprocess.TextPreprocessor(ClipSpec("mmfuse-tiny"), max_text_chars=4096)
    reference = open_clip.get_tokenizer("mmfuse-tiny")
    rng = random.Random(0)
    specials = dict(handler.tokenizer.cache)
    for _ in range(20):
        texts = [" ".join("".join(rng.choice(string.ascii_lowercase) for _ in range(7)) for _ in range(30))
                 + " <end_of_text> tail" for _ in range(4)]
        column = np.array([[t.encode()] for t in texts], dtype=object)
        out = handler({"TEXT": column}, frozenset({"TOKENS"}))
        np.testing.assert_array_equal(out["TOKENS"], reference(texts).numpy())
        assert len(handler.tokenizer.cache) <= 500 + 4 * 32
    assert all(handler.tokenizer.cache.get(k) == v for k, v in specials.items())
