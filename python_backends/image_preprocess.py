"""Encoded image bytes -> the exact tensor open_clip's own preprocessing gives.

Decoding is per row and never raises: a row that cannot be used gets a status
(``missing``, ``too_large``, ``undecodable``) and a zero tensor, and the other
rows are untouched. The pixel transform is open_clip's own inference transform
for the configured model, so served pixels equal ``preprocess(PIL image)``.

Parameters: the handler's ``parameters`` (docs/configuration.md is generated from them).

Speed (measured by ``mmfuse bench``): the geometric part of open_clip's transform (resize, crop)
runs on the PIL image as open_clip runs it; the tail ``ToTensor`` + ``Normalize`` is replaced by a
per-channel lookup table of the 256 values those two steps give for each byte, written straight
into the batch tensor. The table is built by running open_clip's own ToTensor and Normalize, so the
pixels are bit-identical (the parity tests check it); a transform of another shape falls back to
running it whole.

``max_image_pixels`` also bounds the image *after* the resize to the model's input: a thin strip
(1 x 40000 pixels, a few hundred bytes) would otherwise be resized to 64 x 2,560,000 pixels (or
224 x 8,960,000 for ViT-B-32) before the centre crop -> ``too_large``, decided from the header.
Only the formats in ``DECODED_FORMATS`` are decoded; anything else (PostScript/EPS, which Pillow
would hand to Ghostscript, PDF, SVG, PSD, ...) is ``undecodable``.
"""
from __future__ import annotations

import io
import math
import re
import struct
import warnings
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from mmfuse.wire import MISSING, OK, TOO_LARGE, UNDECODABLE, column_bytes, status_column

from .handler import Handler, InputSpec
from .openclip_models import CLIP_DOC_EXAMPLE, PREPROCESS_CLIP_PARAMETERS, ClipSpec, preprocess_config
from .params import ModelContext, Params

DEFAULT_MAX_IMAGE_BYTES = 16 * 1024 * 1024
DEFAULT_MAX_IMAGE_PIXELS = 40_000_000
# Pillow formats that are decoded (JPEG includes the multi-picture JPEGs, MPO, that phone cameras write).
DECODED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")


@dataclass(frozen=True)
class ImageLimits:
    max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS


class ImageRejected(Exception):
    def __init__(self, status: str, detail: str = ""):
        super().__init__(detail or status)
        self.status = status


def _to_8bit_rgb(image):
    """Grey, palette, CMYK, 16-bit and float images to 8-bit RGB (what open_clip's convert('RGB') expects)."""
    from PIL import Image

    mode = image.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        # PIL clips 16/32-bit values to 0..255 in convert('L'); rescale to the full range first.
        array = np.asarray(image, dtype=np.float64)
        if mode.startswith("I;16"):
            array = array / 257.0
        else:
            low, high = float(array.min()), float(array.max())
            array = (array - low) * (255.0 / (high - low)) if high > low else np.zeros_like(array)
        image = Image.fromarray(np.clip(np.rint(array), 0, 255).astype(np.uint8), mode="L")
    return image if image.mode == "RGB" else image.convert("RGB")


def resized_pixels(width: int, height: int, size, resize_mode: str = "shortest") -> float:
    """Pixels of a width x height image after open_clip's inference resize to ``size`` (before the crop)."""
    target_h, target_w = (size, size) if isinstance(size, int) else tuple(size)[-2:]
    if resize_mode == "squash":
        return float(target_h * target_w)
    scales = (target_h / height, target_w / width)
    scale = min(scales) if resize_mode == "longest" else max(scales)
    return width * height * scale * scale


def draft_size(width: int, height: int, size, resize_mode: str = "shortest") -> tuple[int, int]:
    """The smallest decoded size that still covers open_clip's resize of a width x height image to ``size``."""
    target_h, target_w = (size, size) if isinstance(size, int) else tuple(size)[-2:]
    if resize_mode == "squash":
        return target_w, target_h
    scales = (target_h / height, target_w / width)
    scale = min(scales) if resize_mode == "longest" else max(scales)
    return max(1, math.ceil(width * scale)), max(1, math.ceil(height * scale))


# Base64 as JSON clients send it (Triton's HTTP/REST endpoint carries BYTES elements as strings): the alphabet,
# optional padding and line breaks. Raw image bytes never match: every decoded format starts with bytes outside it.
_BASE64 = re.compile(rb"[A-Za-z0-9+/\s]+={0,2}\s*")
_DATA_URI = re.compile(rb"data:([\w.+-]+/[\w.+-]+)?((?:;[\w.+-]+=[\w.+-]+)*)(;base64)?,", re.IGNORECASE)
_IMAGE_MAGIC = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF87a", b"GIF89a", b"BM", b"II*\x00", b"MM\x00*")


def unwrap_base64(data: bytes, limits: ImageLimits = ImageLimits()) -> bytes:
    """The image inside a ``data:image/...;base64,`` URI or a plain base64 string; other bytes unchanged.

    A data URI that is not base64, or whose payload is not valid base64, is ``undecodable``; a plain string
    counts as base64 only when it decodes to an image's magic bytes. The encoded text is bounded by
    ``max_image_bytes`` (4/3 of it, as base64 grows) before anything is decoded.
    """
    import base64
    import binascii

    head = data[:5].lower()
    if head != b"data:" and not _BASE64.fullmatch(data[:4096]):
        return data
    if len(data) > limits.max_image_bytes * 4 // 3 + 4096:
        raise ImageRejected(TOO_LARGE, f"{len(data)} bytes of base64 > max_image_bytes {limits.max_image_bytes}")
    if head == b"data:":
        header = _DATA_URI.match(data)
        if header is None or header.group(3) is None:
            raise ImageRejected(UNDECODABLE, "a data URI that is not ;base64")
        payload = data[header.end():]
    elif _BASE64.fullmatch(data):
        payload = data
    else:
        return data
    try:
        decoded = base64.b64decode(b"".join(payload.split()), validate=True)
    except (binascii.Error, ValueError):
        if head == b"data:":
            raise ImageRejected(UNDECODABLE, "a data URI whose payload is not base64") from None
        return data
    if head != b"data:" and not decoded.startswith(_IMAGE_MAGIC) and decoded[8:12] != b"WEBP":
        return data  # text that happens to be base64-shaped: not an image either way
    return decoded


def decode_image(data: bytes, limits: ImageLimits = ImageLimits(), resize_to=None, resize_mode: str = "shortest",
                 jpeg_draft: bool = False):
    """Bytes -> an RGB PIL image (first frame, EXIF orientation applied). Raises ImageRejected.

    With ``resize_to`` (the transform's size), an image whose resize would exceed ``max_image_pixels``
    is rejected from its header, before any pixel is decoded. With ``jpeg_draft`` (and ``resize_to``),
    a JPEG is decoded at the smallest DCT scale (1, 1/2, 1/4, 1/8) that still covers the resize.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    if not data:
        raise ImageRejected(MISSING)
    data = unwrap_base64(data, limits)
    if len(data) > limits.max_image_bytes:
        raise ImageRejected(TOO_LARGE, f"{len(data)} bytes > max_image_bytes {limits.max_image_bytes}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            Image.init()  # registers every plugin (once); open() with formats= does not
            image = Image.open(io.BytesIO(data), formats=DECODED_FORMATS)
            width, height = image.size
            if width <= 0 or height <= 0:
                raise ImageRejected(UNDECODABLE, f"image size {width}x{height}")
            if width * height > limits.max_image_pixels:
                raise ImageRejected(
                    TOO_LARGE, f"{width}x{height} pixels > max_image_pixels {limits.max_image_pixels}"
                )
            if resize_to is not None and resized_pixels(width, height, resize_to, resize_mode) > limits.max_image_pixels:
                raise ImageRejected(
                    TOO_LARGE, f"{width}x{height} pixels would be resized to more than max_image_pixels "
                               f"{limits.max_image_pixels} (aspect ratio)"
                )
            if getattr(image, "n_frames", 1) > 1:
                image.seek(0)
            if jpeg_draft and resize_to is not None and image.format in ("JPEG", "MPO"):
                # EXIF orientation is applied after decoding: a quarter turn swaps the target's sides.
                sideways = _turns_sideways(image)
                dw, dh = draft_size(*((height, width) if sideways else (width, height)), resize_to, resize_mode)
                image.draft(image.mode, (dh, dw) if sideways else (dw, dh))
            image.load()
            image = ImageOps.exif_transpose(image)
            return _to_8bit_rgb(image)
    except ImageRejected:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise ImageRejected(TOO_LARGE, str(error)) from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError, IndexError,
            TypeError, KeyError, MemoryError, struct.error) as error:
        raise ImageRejected(UNDECODABLE, f"{type(error).__name__}: {error}") from None


def _turns_sideways(image) -> bool:
    try:
        return image.getexif().get(0x0112, 1) in (5, 6, 7, 8)
    except Exception:  # noqa: BLE001 - a broken EXIF block is ignored here as exif_transpose ignores it
        return False


def split_transform(transform):
    """(geometric part, lookup table [3,256] float32) of an open_clip inference transform, or None.

    The transform must end with MaybeConvertMode (or none), MaybeToTensor and Normalize, as open_clip's
    image_transform_v2 builds it. The table holds, per channel, what ToTensor + Normalize give for each
    byte value: computed by those very modules, so applying it is bit-identical to running them.
    """
    import torch
    from PIL import Image
    from torchvision.transforms import Compose, Normalize

    steps = list(getattr(transform, "transforms", ()))
    if len(steps) < 2 or not isinstance(steps[-1], Normalize) or type(steps[-2]).__name__ != "MaybeToTensor":
        return None
    to_tensor, normalize = steps[-2], steps[-1]
    head = steps[:-2]
    if head and type(head[-1]).__name__ == "MaybeConvertMode":
        if getattr(head[-1], "mode", "RGB") != "RGB":
            return None
        head = head[:-1]
    ramp = np.repeat(np.arange(256, dtype=np.uint8)[None, :, None], 3, axis=2)  # a 1 x 256 RGB image
    with torch.no_grad():
        table = normalize(to_tensor(Image.fromarray(ramp, "RGB"))).numpy()[:, 0, :]
    if table.shape != (3, 256) or table.dtype != np.float32:
        return None
    return Compose(head), np.ascontiguousarray(table)


@dataclass(frozen=True)
class ImagePreprocessConfig:
    spec: ClipSpec  # the transform is the model's
    limits: ImageLimits = ImageLimits()
    decode_threads: int = 2
    jpeg_draft: bool = False


class ImagePreprocessor(Handler):
    """Handler of the image_preprocess model: IMAGE bytes [B,1] -> PIXELS [B,3,H,W], VALID, STATUS."""

    name = "image_preprocess"
    metrics_labels = ("image", "preprocess")
    INPUTS = (InputSpec("IMAGE", "O", row_rank=1),)
    OUTPUTS = ("PIXELS", "VALID", "STATUS")
    parameters = {
        **PREPROCESS_CLIP_PARAMETERS,
        "max_image_bytes": "encoded size limit per image; over it the row is too_large",
        "max_image_pixels": "width x height limit, read from the header before decoding (decompression bombs), "
                            "and the same bound on the image after the resize to the model input; over it: too_large",
        "decode_threads": "images decoded in parallel per batch (PIL frees the GIL)",
        "jpeg_draft": "true: decode JPEGs at a reduced size (libjpeg's DCT scaling, never below the resize target) "
                      "before open_clip's resize: faster for large photos, pixels no longer exactly open_clip's",
    }
    doc_examples = (CLIP_DOC_EXAMPLE,)

    def __init__(self, spec: ClipSpec, limits: ImageLimits = ImageLimits(), decode_threads: int = 2,
                 jpeg_draft: bool = False, fast_tail: bool = True):
        from open_clip.transform import image_transform_v2

        self.config = ImagePreprocessConfig(spec, limits, decode_threads, jpeg_draft)
        self.spec = spec
        self.limits = limits
        self.jpeg_draft = jpeg_draft
        self.cfg = preprocess_config(spec)
        self.transform: Callable = image_transform_v2(self.cfg, is_train=False)
        self.input_size = tuple(self.cfg.input_size)
        split = split_transform(self.transform) if fast_tail else None
        self._geometry, self._table = split if split is not None else (None, None)
        self._pool = ThreadPoolExecutor(decode_threads, thread_name_prefix="decode") if decode_threads > 1 else None

    @classmethod
    def parse(cls, context: ModelContext, params: Params) -> ImagePreprocessConfig:
        limits = ImageLimits(
            max_image_bytes=params.int("max_image_bytes", DEFAULT_MAX_IMAGE_BYTES, minimum=1),
            max_image_pixels=params.int("max_image_pixels", DEFAULT_MAX_IMAGE_PIXELS, minimum=1),
        )
        return ImagePreprocessConfig(ClipSpec.from_params(params, context, weights=False), limits,
                                     params.int("decode_threads", 2, minimum=1, maximum=64),
                                     params.bool("jpeg_draft", False))

    @classmethod
    def build(cls, context: ModelContext, config: ImagePreprocessConfig) -> ImagePreprocessor:
        return cls(config.spec, config.limits, config.decode_threads, config.jpeg_draft)

    def decode(self, data: bytes):
        return decode_image(data, self.limits, self.cfg.size, self.cfg.resize_mode, jpeg_draft=self.jpeg_draft)

    def preprocess_into(self, data: bytes, out: np.ndarray) -> str:
        """Decode one image and write its pixels into ``out`` [3,H,W] (left untouched unless ``ok``)."""
        try:
            image = self.decode(data)
            if self._geometry is None:
                out[...] = self.transform(image).numpy()
                return OK
            rgb = np.asarray(self._geometry(image))
            if rgb.shape != (out.shape[1], out.shape[2], 3) or rgb.dtype != np.uint8:
                out[...] = self.transform(image).numpy()  # anything unexpected: open_clip's transform whole
                return OK
            for channel in range(3):
                np.take(self._table[channel], rgb[:, :, channel], out=out[channel])
            return OK
        except ImageRejected as rejected:
            return rejected.status
        except Exception:  # noqa: BLE001 - a row never fails the batch
            return UNDECODABLE

    def preprocess_one(self, data: bytes) -> tuple[np.ndarray | None, str]:
        out = np.zeros(self.input_size, dtype=np.float32)
        status = self.preprocess_into(data, out)
        return (out if status == OK else None), status

    def __call__(self, batch: Mapping[str, np.ndarray], requested: frozenset[str]) -> dict[str, np.ndarray]:
        rows = column_bytes(batch["IMAGE"])
        pixels = np.zeros((len(rows),) + self.input_size, dtype=np.float32)
        mapper = self._pool.map if self._pool is not None and len(rows) > 1 else map
        statuses = list(mapper(self.preprocess_into, rows, pixels))
        for i, status in enumerate(statuses):
            if status != OK:
                pixels[i] = 0.0  # a row that failed half-way holds nothing of it
        valid = np.array([[status == OK] for status in statuses], dtype=bool).reshape(len(rows), 1)
        return {"PIXELS": pixels, "VALID": valid, "STATUS": status_column(statuses)}

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False)
