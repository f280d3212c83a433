"""mmfuse.serving.text_preprocess: UTF-8 bytes -> open_clip tokens, per row, never failing the batch."""
from __future__ import annotations

import numpy as np
import pytest

from mmfuse.serving.openclip_models import ClipSpec
from mmfuse.serving.params import Params
from mmfuse.serving.text_preprocess import TextPreprocessor
from tests.unit.conftest import SHIPPED_MODEL, TINY, bytes_column, context_for, decode_column, load_model_config

MAX_CHARS = 50
CAPTIONS = [
    "a photo of a cat",
    "An astronaut riding a horse, in the style of a 1970s NASA photograph!",
    "café crème — 咖啡 ☕",
    " leading and trailing spaces ",
    "word " * 200,  # over the context length: truncated exactly as open_clip does
]
OUTPUTS = frozenset({"TOKENS", "VALID", "STATUS"})


@pytest.fixture(scope="module")
def preprocessor(open_clip_tiny) -> TextPreprocessor:
    return TextPreprocessor(ClipSpec(TINY), max_text_chars=2000)


@pytest.fixture(scope="module")
def strict_preprocessor(open_clip_tiny) -> TextPreprocessor:
    return TextPreprocessor(ClipSpec(TINY), max_text_chars=MAX_CHARS)


def run(handler: TextPreprocessor, texts) -> dict[str, np.ndarray]:
    return handler({"TEXT": bytes_column(texts)}, OUTPUTS)


def test_tokens_equal_open_clip_tokenizer(preprocessor, tiny_tokenizer):
    out = run(preprocessor, CAPTIONS)
    expected = tiny_tokenizer(CAPTIONS).numpy()
    assert out["TOKENS"].dtype == np.int64
    assert out["TOKENS"].shape == (len(CAPTIONS), 77) == expected.shape
    np.testing.assert_array_equal(out["TOKENS"], expected)
    assert out["VALID"].all() and out["VALID"].shape == (len(CAPTIONS), 1)
    assert decode_column(out["STATUS"]) == ["ok"] * len(CAPTIONS)


@pytest.mark.parametrize("column", [
    pytest.param(lambda texts: bytes_column(texts), id="object-bytes"),
    pytest.param(lambda texts: np.array([[t] for t in texts], dtype=object), id="object-str"),
    pytest.param(lambda texts: np.array([[t.encode()] for t in texts], dtype=np.bytes_), id="fixed-bytes"),
])
def test_string_column_flavours(preprocessor, tiny_tokenizer, column):
    texts = ["two dogs", "café"]
    out = preprocessor({"TEXT": column(texts)}, OUTPUTS)
    np.testing.assert_array_equal(out["TOKENS"], tiny_tokenizer(texts).numpy())


@pytest.mark.parametrize("data, status", [
    (b"", "missing"),
    (b"   ", "missing"),
    (b"\n\t \r\n", "missing"),
    (b"\xff\xfe not utf-8", "undecodable"),
    (b"caf\xe9", "undecodable"),  # latin-1, not UTF-8
    (b"x" * (MAX_CHARS + 1), "too_large"),
    ("é".encode() * (MAX_CHARS + 1), "too_large"),  # characters are counted, not bytes
])
def test_rejected_rows(strict_preprocessor, data, status):
    out = run(strict_preprocessor, [data])
    assert decode_column(out["STATUS"]) == [status]
    assert not out["VALID"][0, 0]
    assert not out["TOKENS"].any()


def test_limit_is_inclusive(strict_preprocessor):
    out = run(strict_preprocessor, ["x" * MAX_CHARS, "é" * MAX_CHARS])
    assert decode_column(out["STATUS"]) == ["ok", "ok"]


def test_rows_are_independent(strict_preprocessor):
    texts = [b"a photo of a cat", b"", b"\xff", b"two dogs", b"y" * 999, b"  ", "咖啡".encode()]
    out = run(strict_preprocessor, texts)
    assert decode_column(out["STATUS"]) == ["ok", "missing", "undecodable", "ok", "too_large", "missing", "ok"]
    np.testing.assert_array_equal(out["VALID"][:, 0], [True, False, False, True, False, False, True])
    for i, text in enumerate(texts):
        alone = run(strict_preprocessor, [text])
        for name in OUTPUTS:
            np.testing.assert_array_equal(out[name][i], alone[name][0], err_msg=f"{name} row {i}")


def test_built_from_the_repository_config(open_clip_tiny):
    params = Params.from_model_config("text_preprocess", load_model_config("text_preprocess"))
    handler = TextPreprocessor.from_parameters(context_for("text_preprocess"), params)
    params.reject_unknown()
    assert handler.spec.model_name == SHIPPED_MODEL
    assert handler.max_text_chars == 4096
    assert handler.context_length == 77
