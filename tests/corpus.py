"""A corpus of bad input for the three public ensembles, as plain data.

Two kinds of case:

* ``RowCase``: one element of a TYPE_STRING column (an encoded image or a UTF-8 text). The server must
  never fail the request for it: the row is answered with a status (``ok`` for odd but valid input such
  as a CMYK JPEG or an emoji, otherwise ``missing``, ``undecodable`` or ``too_large``) and a masked,
  all-zero embedding when the status is not ``ok``. ``modality`` says which input it goes to: image
  cases are sent as ``IMAGE`` to embed_image and fuse_image_text, text cases as ``TEXT`` to embed_text
  and fuse_image_text.
* ``RequestCase``: a structurally wrong request (wrong data type, wrong shape, batch over
  ``max_batch_size``, missing or unknown tensor, element count that does not match the shape). It must
  be answered ``INVALID_ARG`` with a message that contains every string of ``mentions`` (the tensor's
  name; for a batch over the limit, the limit). Each is a list of raw wire tensors
  (``WireTensor``: name, Triton datatype, shape, raw bytes) so that requests a well-behaved client
  library would refuse to build can be sent as well; ``request_cases(ensemble)`` builds the family for
  one ensemble.

Everything is generated here, deterministically, offline; nothing is downloaded. Limits that depend on
the served configuration (``max_image_bytes``, ``max_text_chars``) are arguments.
"""
from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache

import numpy as np

OK, MISSING, UNDECODABLE, TOO_LARGE = "ok", "missing", "undecodable", "too_large"

# The public ensembles and their TYPE_STRING inputs (model_repository/<name>/config.pbtxt).
ENSEMBLES: dict[str, tuple[str, ...]] = {
    "embed_image": ("IMAGE",),
    "embed_text": ("TEXT",),
    "fuse_image_text": ("IMAGE", "TEXT"),
}
MAX_BATCH_SIZE = 64


@dataclass(frozen=True)
class RowCase:
    name: str
    modality: str  # "image" or "text": which input the element goes to
    data: bytes
    status: str  # what the server must answer for the row

    @property
    def tensor(self) -> str:
        return self.modality.upper()


@dataclass(frozen=True)
class WireTensor:
    """One input tensor exactly as it goes on the wire (KServe v2 gRPC: raw_input_contents)."""

    name: str
    datatype: str  # BYTES, FP32, INT64, BOOL, ...
    shape: tuple[int, ...]
    raw: bytes


@dataclass(frozen=True)
class RequestCase:
    name: str
    ensemble: str
    tensors: tuple[WireTensor, ...]
    mentions: tuple[str, ...]  # what the INVALID_ARG message must contain
    outputs: tuple[str, ...] = ()  # requested outputs; empty = all


# -- wire encoding ---------------------------------------------------------------------------------------
def bytes_raw(items: Sequence[bytes]) -> bytes:
    """Triton's BYTES serialisation: each element as a 4-byte little-endian length and its bytes."""
    return b"".join(struct.pack("<I", len(item)) + item for item in items)


def bytes_tensor(name: str, items: Sequence[bytes], shape: tuple[int, ...] | None = None) -> WireTensor:
    return WireTensor(name, "BYTES", shape if shape is not None else (len(items), 1), bytes_raw(items))


def array_tensor(name: str, array: np.ndarray, datatype: str) -> WireTensor:
    return WireTensor(name, datatype, tuple(array.shape), np.ascontiguousarray(array).tobytes())


# -- images ----------------------------------------------------------------------------------------------
def _encode(image, fmt: str, **kwargs) -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt, **kwargs)
    return out.getvalue()


def _rgb(width: int = 96, height: int = 80, seed: int = 0) -> np.ndarray:
    """A smooth, deterministic colour image with a little texture."""
    y, x = np.mgrid[0:height, 0:width]
    rng = np.random.default_rng(seed)
    base = np.stack([255 * x / max(width - 1, 1), 255 * y / max(height - 1, 1),
                     127 + 100 * np.sin((x + y) / 7.0)], axis=-1)
    return np.clip(base + rng.normal(0, 8, base.shape), 0, 255).astype(np.uint8)


def _image(mode: str = "RGB", width: int = 96, height: int = 80, seed: int = 0):
    from PIL import Image

    return Image.fromarray(_rgb(width, height, seed)).convert(mode)


def clean_jpeg(seed: int = 0) -> bytes:
    return _encode(_image(seed=seed), "JPEG", quality=90)


def clean_png(seed: int = 0) -> bytes:
    return _encode(_image(seed=seed), "PNG")


def _chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def png_header(width: int, height: int, bit_depth: int = 8, colour_type: int = 2) -> bytes:
    """A PNG that claims width x height pixels: signature, IHDR (valid CRC), IEND; no pixel data."""
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IEND", b"")


def png_bomb(width: int, height: int) -> bytes:
    """A real, complete grey PNG of width x height zero pixels: tiny on the wire, huge decoded."""
    row = b"\x00" + b"\x00" * width  # filter byte + pixels
    compressor = zlib.compressobj(9)
    body = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", body) + _chunk(b"IEND", b"")


def png_text_bomb() -> bytes:
    """A valid small PNG with a zTXt chunk that inflates to 64 MiB of text (a metadata bomb)."""
    data = clean_png()
    payload = b"Comment\x00\x00" + zlib.compress(b"\x00" * (64 << 20), 9)
    iend = data.rindex(b"IEND") - 4
    return data[:iend] + _chunk(b"zTXt", payload) + data[iend:]


def gif_header(width: int, height: int) -> bytes:
    """A GIF whose logical screen and only image claim width x height; the pixel data is one code."""
    screen = b"GIF89a" + struct.pack("<HHBBB", width, height, 0x80, 0, 0) + b"\x00\x00\x00\xff\xff\xff"
    image = b"," + struct.pack("<HHHHB", 0, 0, width, height, 0) + b"\x02\x02\x44\x01\x00"
    return screen + image + b";"


def bmp_header(width: int, height: int) -> bytes:
    """A BMP (BITMAPINFOHEADER, 24 bit) that claims width x height and carries no pixels."""
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 24, 0, 0, 2835, 2835, 0, 0)
    return b"BM" + struct.pack("<IHHI", 14 + len(info), 0, 0, 14 + len(info)) + info


def tiff_header(width: int, height: int) -> bytes:
    from PIL import Image

    data = bytearray(_encode(Image.new("L", (4, 4)), "TIFF"))
    # Patch ImageWidth (256) and ImageLength (257) in the first IFD to LONG values.
    ifd = struct.unpack_from("<I", data, 4)[0]
    count = struct.unpack_from("<H", data, ifd)[0]
    for i in range(count):
        entry = ifd + 2 + 12 * i
        tag = struct.unpack_from("<H", data, entry)[0]
        if tag in (256, 257):
            struct.pack_into("<HHII", data, entry, tag, 4, 1, width if tag == 256 else height)
    return bytes(data)


def animated(fmt: str) -> bytes:
    frames = [_image(seed=s) for s in range(3)]
    if fmt == "GIF":
        frames = [f.convert("P") for f in frames]
    kwargs = {"save_all": True, "append_images": frames[1:], "duration": 100, "loop": 0}
    return _encode(frames[0], fmt, **kwargs)


def cmyk_jpeg() -> bytes:
    return _encode(_image("CMYK"), "JPEG", quality=90)


def grey16_png() -> bytes:
    from PIL import Image

    gradient = (np.arange(96 * 80, dtype=np.uint32).reshape(80, 96) * 8).astype(np.uint16)
    return _encode(Image.fromarray(gradient), "PNG")


def palette_png() -> bytes:
    image = _image().convert("P", palette=1, colors=16)  # adaptive palette
    return _encode(image, "PNG", transparency=0)


def exif_rotated_jpeg() -> bytes:
    from PIL import Image

    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90
    return _encode(_image(), "JPEG", exif=exif.tobytes())


def broken_exif_jpeg() -> bytes:
    """A JPEG whose APP1 Exif segment is garbage (orientation cannot be read)."""
    data = _encode(_image(), "JPEG", quality=90)
    junk = b"Exif\x00\x00" + b"II*\x00" + b"\xff\xff\xff\x7f" + b"\xde\xad" * 40
    return data[:2] + b"\xff\xe1" + struct.pack(">H", len(junk) + 2) + junk + data[2:]


def bad_crc_png() -> bytes:
    data = bytearray(clean_png())
    data[29] ^= 0xFF  # last byte of IHDR's CRC
    return bytes(data)


def eps_document() -> bytes:
    """Encapsulated PostScript: decoding it would run Ghostscript on the payload. Must not be decoded."""
    return (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 16 16\n"
            b"%%EndComments\n/Helvetica findfont 4 scalefont setfont 0 0 moveto (x) show\nshowpage\n%%EOF\n")


@cache
def _random_bytes(size: int, seed: int) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8).tobytes()


def image_cases(max_image_bytes: int) -> list[RowCase]:
    """Image elements and the status each must get (``max_image_bytes`` as served)."""
    from PIL import Image

    jpeg, png = clean_jpeg(), clean_png()
    huge = max(max_image_bytes + 1, 20 << 20)  # over the served limit and over the shipped 16 MiB
    return [
        RowCase("empty", "image", b"", MISSING),
        RowCase("truncated-jpeg", "image", jpeg[: len(jpeg) // 3], UNDECODABLE),
        RowCase("truncated-png", "image", png[: len(png) // 2], UNDECODABLE),
        RowCase("jpeg-magic-only", "image", b"\xff\xd8\xff\xe0\x00\x10JFIF\x00", UNDECODABLE),
        RowCase("garbage", "image", _random_bytes(4096, 1), UNDECODABLE),
        RowCase("zero-bytes", "image", b"\x00" * 1024, UNDECODABLE),
        RowCase("png-body-jpeg-magic", "image", b"\xff\xd8\xff\xe0" + png[4:], UNDECODABLE),
        RowCase("jpeg-body-png-magic", "image", b"\x89PNG\r\n\x1a\n" + jpeg[8:], UNDECODABLE),
        RowCase("png-bad-crc", "image", bad_crc_png(), UNDECODABLE),
        RowCase("text-as-image", "image", b"a photo of a cat", UNDECODABLE),
        RowCase("url-as-image", "image", b"http://127.0.0.1:9/cat.jpg", UNDECODABLE),
        RowCase("svg", "image", b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>', UNDECODABLE),
        RowCase("pdf", "image", b"%PDF-1.4\n1 0 obj<<>>endobj\ntrailer<<>>\n%%EOF", UNDECODABLE),
        RowCase("eps-postscript", "image", eps_document(), UNDECODABLE),
        RowCase("zero-size-png-header", "image", png_header(0, 0), UNDECODABLE),
        RowCase("cmyk-jpeg", "image", cmyk_jpeg(), OK),
        RowCase("grey-16-bit-png", "image", grey16_png(), OK),
        RowCase("palette-png-transparency", "image", palette_png(), OK),
        RowCase("rgba-png", "image", _encode(_image("RGBA"), "PNG"), OK),
        RowCase("grey-alpha-png", "image", _encode(_image("LA"), "PNG"), OK),
        RowCase("bilevel-png", "image", _encode(_image("1"), "PNG"), OK),
        RowCase("float-tiff", "image", _encode(_image("F"), "TIFF"), OK),
        RowCase("animated-gif", "image", animated("GIF"), OK),
        RowCase("animated-webp", "image", animated("WEBP"), OK),
        RowCase("animated-png", "image", animated("PNG"), OK),
        RowCase("one-by-one-png", "image", _encode(Image.new("RGB", (1, 1), (200, 10, 10)), "PNG"), OK),
        RowCase("one-by-one-jpeg", "image", _encode(Image.new("RGB", (1, 1), (10, 200, 10)), "JPEG"), OK),
        RowCase("exif-rotated-jpeg", "image", exif_rotated_jpeg(), OK),
        RowCase("broken-exif-jpeg", "image", broken_exif_jpeg(), OK),
        RowCase("png-ztxt-metadata-bomb", "image", png_text_bomb(), UNDECODABLE),
        RowCase("png-header-20000x20000", "image", png_header(20000, 20000), TOO_LARGE),
        RowCase("gif-header-65535x65535", "image", gif_header(65535, 65535), TOO_LARGE),
        RowCase("bmp-header-30000x30000", "image", bmp_header(30000, 30000), TOO_LARGE),
        RowCase("tiff-header-20000x20000", "image", tiff_header(20000, 20000), TOO_LARGE),
        RowCase("png-decompression-bomb-8000x8000", "image", png_bomb(8000, 8000), TOO_LARGE),
        # A thin strip within the pixel limit whose resize to the model's input would not be.
        RowCase("png-strip-1x40000", "image", png_bomb(1, 40000), TOO_LARGE),
        RowCase("png-strip-40000x1", "image", png_bomb(40000, 1), TOO_LARGE),
        RowCase("huge-random-bytes", "image", _random_bytes(huge, 2), TOO_LARGE),
        RowCase("jpeg-with-20MiB-trailer", "image", jpeg + b"\x00" * huge, TOO_LARGE),
    ]


def text_cases(max_text_chars: int) -> list[RowCase]:
    """Text elements and the status each must get (``max_text_chars`` as served)."""
    def text(name: str, value: str | bytes, status: str) -> RowCase:
        return RowCase(name, "text", value.encode("utf-8") if isinstance(value, str) else value, status)

    return [
        text("empty", b"", MISSING),
        text("whitespace-only", " \t\r\n  \x0b\x0c", MISSING),
        text("unicode-whitespace-only", "\u3000\u00a0\u2003\u2028", MISSING),
        text("invalid-utf8", b"\xff\xfe\xfd", UNDECODABLE),
        text("utf8-lone-surrogate", b"caption \xed\xa0\x80 here", UNDECODABLE),
        text("utf8-overlong", b"\xc0\xaf etc", UNDECODABLE),
        text("utf8-truncated-sequence", b"caf\xc3", UNDECODABLE),
        text("latin1-encoded", "caf\u00e9 cr\u00e8me".encode("latin-1"), UNDECODABLE),
        text("utf16-with-bom", "a cat".encode("utf-16"), UNDECODABLE),
        text("jpeg-as-text", clean_jpeg(), UNDECODABLE),
        text("huge-random-bytes", _random_bytes(20 << 20, 3), UNDECODABLE),
        text("nul-bytes", b"a cat\x00\x00 on a mat", OK),
        text("control-characters", "\x1b[31mred\x1b[0m \x07\x08 bell\x7f", OK),
        text("only-control-characters", "\x00\x01\x02\x03", OK),
        text("emoji", "a cat \U0001F431 riding a rocket \U0001F680", OK),
        text("emoji-zwj-sequences", "\U0001F469\u200d\U0001F469\u200d\U0001F467\u200d\U0001F466 \U0001F44D\U0001F3FD", OK),
        text("bidi-override", "\u202eevil\u202c caption \u2066x\u2069", OK),
        text("zero-width-only", "\u200b\u200c\u200d\ufeff", OK),
        text("utf8-bom-prefix", "\ufeffa photo of a dog", OK),
        text("cjk-and-arabic", "\u732b\u306e\u5199\u771f \u0642\u0637\u0629", OK),
        text("combining-marks", "z" + "\u0301\u0302\u0303" * 300, OK),
        text("html-entities", "&lt;script&gt;alert(1)&lt;/script&gt; &amp;amp;", OK),
        text("special-token-strings", "<start_of_text> <end_of_text> a cat", OK),
        text("one-long-word-at-limit", "a" * max_text_chars, OK),
        text("at-limit", ("word " * max_text_chars)[:max_text_chars], OK),
        text("emoji-at-limit", "\U0001F600" * max_text_chars, OK),
        text("over-limit-by-one", "b" * (max_text_chars + 1), TOO_LARGE),
        text("emoji-over-limit", "\U0001F600" * (max_text_chars + 1), TOO_LARGE),
        text("huge-ascii", "x" * (20 << 20), TOO_LARGE),
    ]


def row_cases(max_image_bytes: int, max_text_chars: int) -> list[RowCase]:
    return image_cases(max_image_bytes) + text_cases(max_text_chars)


# -- structurally wrong requests -------------------------------------------------------------------------
def _clean(name: str, rows: int = 1) -> WireTensor:
    item = clean_jpeg() if name == "IMAGE" else b"a caption"
    return bytes_tensor(name, [item] * rows)


def request_cases(ensemble: str) -> list[RequestCase]:
    """Structurally wrong requests to ``ensemble``; each must get INVALID_ARG with ``mentions`` in its message."""
    names = ENSEMBLES[ensemble]
    cases: list[RequestCase] = []

    def case(label: str, target: str, replace: WireTensor | None, *, rows: int = 1,
             mentions: tuple[str, ...] = ()) -> None:
        # The other inputs are clean and agree with the target's batch size (``rows``).
        tensors = [replace if (n == target and replace is not None) else _clean(n, rows)
                   for n in names if not (n == target and replace is None)]
        cases.append(RequestCase(f"{ensemble}/{target}/{label}", ensemble, tuple(tensors), mentions or (target,)))

    for name in names:
        case("fp32-instead-of-bytes", name, array_tensor(name, np.zeros((1, 1), np.float32), "FP32"))
        case("int64-instead-of-bytes", name, array_tensor(name, np.arange(1, dtype=np.int64).reshape(1, 1), "INT64"))
        case("bool-instead-of-bytes", name, array_tensor(name, np.ones((1, 1), bool), "BOOL"))
        case("two-elements-per-row", name, bytes_tensor(name, [b"a", b"b"], (1, 2)))
        case("no-batch-dimension", name, bytes_tensor(name, [b"a"], (1,)))
        case("rank-three", name, bytes_tensor(name, [b"a"], (1, 1, 1)))
        case("zero-width-row", name, WireTensor(name, "BYTES", (1, 0), b""))
        case("fewer-elements-than-shape", name, WireTensor(name, "BYTES", (3, 1), bytes_raw([b"a"])), rows=3)
        case("length-prefix-past-end", name, WireTensor(name, "BYTES", (1, 1), struct.pack("<I", 1 << 30) + b"abc"))
        case("truncated-length-prefix", name, WireTensor(name, "BYTES", (1, 1), b"\x05\x00"))
        limit = ("batch-size", f"<= {MAX_BATCH_SIZE}")
        case("batch-over-max-batch-size", name, bytes_tensor(name, [b"a"] * (MAX_BATCH_SIZE + 1)),
             rows=MAX_BATCH_SIZE + 1, mentions=limit)
        case("batch-of-4096", name, bytes_tensor(name, [b""] * 4096), rows=4096, mentions=limit)
        case("missing", name, None)
    # Tensors the ensemble does not have.
    unknown = bytes_tensor("AUDIO", [b"\x00\x01"])
    cases.append(RequestCase(f"{ensemble}/AUDIO/unknown-input", ensemble,
                             tuple(_clean(n) for n in names) + (unknown,), ("AUDIO",)))
    cases.append(RequestCase(f"{ensemble}/SECRET/unknown-output", ensemble,
                             tuple(_clean(n) for n in names), ("SECRET",), outputs=("SECRET",)))
    if len(names) > 1:
        # Inputs that disagree on the batch size.
        first, second = names
        tensors = (_clean(first, 2), _clean(second, 3))
        cases.append(RequestCase(f"{ensemble}/{first}+{second}/batch-sizes-differ", ensemble, tensors,
                                 ("batch size does not match",)))
    return cases


def all_request_cases() -> list[RequestCase]:
    return [case for ensemble in ENSEMBLES for case in request_cases(ensemble)]


# Requests that Triton 2.51 answers correctly (INVALID_ARG naming the tensor) but then never releases: a
# BYTES element whose length runs past the end is only detected when the ensemble hands the tensor to a
# step, after the other branch of fuse_image_text has started; the ensemble request leaks (one in-flight
# inference each) and repeated, they corrupt later requests and crash the server (SIGSEGV). They are sent to
# a throw-away server (tests/e2e/test_faults.py), never to a shared one.
POISONS_TRITON_2_51 = frozenset({
    "fuse_image_text/IMAGE/length-prefix-past-end",
    "fuse_image_text/TEXT/length-prefix-past-end",
})


def kinds(max_image_bytes: int, max_text_chars: int) -> set[str]:
    """Distinct kinds of bad input in the corpus (a request case counts once, whatever the ensemble)."""
    rows = {f"{c.modality}:{c.name}" for c in row_cases(max_image_bytes, max_text_chars)}
    requests = {c.name.split("/", 2)[2] for c in all_request_cases()}
    return rows | requests
