"""UTF-8 strings -> open_clip token ids for the configured model, per row, never failing the batch.

Parameters: the handler's ``parameters`` (docs/configuration.md is generated from them).

open_clip's SimpleTokenizer memoises the BPE of every distinct word it has seen, without bound:
random words (about 160 bytes of cache each, 30,000 in one 64-row request of 4096-character
texts) would grow the process for ever. The cache is reset, to the special tokens it starts
with, once it holds ``MAX_TOKENIZER_CACHE`` entries.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from mmfuse.wire import MISSING, OK, TOO_LARGE, UNDECODABLE, column_bytes, status_column

from .handler import Handler, InputSpec
from .openclip_models import CLIP_DOC_EXAMPLE, PREPROCESS_CLIP_PARAMETERS, ClipSpec, load_tokenizer
from .params import ModelContext, Params

DEFAULT_MAX_TEXT_CHARS = 4096
MAX_TOKENIZER_CACHE = 100_000  # entries (~16 MB)


def check_text(data: bytes, max_chars: int) -> tuple[str | None, str]:
    """Bytes -> (text, status). Empty or whitespace-only text is ``missing``."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return None, UNDECODABLE
    if not text.strip():
        return None, MISSING
    if len(text) > max_chars:
        return None, TOO_LARGE
    return text, OK


@dataclass(frozen=True)
class TextPreprocessConfig:
    spec: ClipSpec  # the tokenizer is the model's
    max_text_chars: int = DEFAULT_MAX_TEXT_CHARS


class TextPreprocessor(Handler):
    """Handler of the text_preprocess model: TEXT [B,1] -> TOKENS int64 [B,L], VALID, STATUS."""

    name = "text_preprocess"
    metrics_labels = ("text", "preprocess")
    parameters = {
        **PREPROCESS_CLIP_PARAMETERS,
        "max_text_chars": "longer texts (in characters, not bytes) are masked too_large; shorter ones are tokenized "
                          "and cut at the model's context length as open_clip cuts them",
    }
    doc_examples = (CLIP_DOC_EXAMPLE,)

    # AFTER: an optional input that is never read. An ensemble maps another branch's output to it
    # to make the text branch wait for that branch (see fuse_image_text: a Triton 2.51 ensemble
    # bug loses requests, and can crash the server, when one of two parallel branches fails while
    # the other still runs).
    INPUTS = (InputSpec("TEXT", "O", row_rank=1), InputSpec("AFTER", "f", optional=True))
    OUTPUTS = ("TOKENS", "VALID", "STATUS")

    def __init__(self, spec: ClipSpec, max_text_chars: int = DEFAULT_MAX_TEXT_CHARS):
        self.config = TextPreprocessConfig(spec, max_text_chars)
        self.spec = spec
        self.max_text_chars = max_text_chars
        self.tokenizer = load_tokenizer(spec)
        self.context_length = int(self.tokenizer.context_length)
        cache = getattr(self.tokenizer, "cache", None)
        self._cache_seed = dict(cache) if isinstance(cache, dict) else None

    @classmethod
    def parse(cls, context: ModelContext, params: Params) -> TextPreprocessConfig:
        return TextPreprocessConfig(ClipSpec.from_params(params, context, weights=False),
                                    params.int("max_text_chars", DEFAULT_MAX_TEXT_CHARS, minimum=1))

    @classmethod
    def build(cls, context: ModelContext, config: TextPreprocessConfig) -> TextPreprocessor:
        return cls(config.spec, config.max_text_chars)

    def __call__(self, batch: Mapping[str, np.ndarray], requested: frozenset[str]) -> dict[str, np.ndarray]:
        rows = [check_text(data, self.max_text_chars) for data in column_bytes(batch["TEXT"])]
        tokens = np.zeros((len(rows), self.context_length), dtype=np.int64)
        valid = np.array([[text is not None] for text, _ in rows], dtype=bool).reshape(len(rows), 1)
        index = [i for i, (text, _) in enumerate(rows) if text is not None]
        if index:
            tokens[index] = self.tokenizer([rows[i][0] for i in index]).numpy()
            self._bound_tokenizer_cache()
        return {"TOKENS": tokens, "VALID": valid, "STATUS": status_column([status for _, status in rows])}

    def _bound_tokenizer_cache(self) -> None:
        cache = getattr(self.tokenizer, "cache", None)
        if self._cache_seed is not None and isinstance(cache, dict) and len(cache) > MAX_TOKENIZER_CACHE:
            cache.clear()
            cache.update(self._cache_seed)
