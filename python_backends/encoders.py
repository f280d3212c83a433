"""open_clip image and text towers as batch handlers.

Each engine has its module: ``torch_towers`` (the speed-ups applied to open_clip's torch modules, the text
tower with trimming) and ``openvino_engine`` (the engine choice and the OpenVINO-compiled tower); their
names stay importable from here.

Rows marked invalid (VALID false) are not encoded: their EMBEDDING is zeros.
EMBEDDING is L2-normalised, float32 whatever the compute precision. SEQUENCE (the
token sequence of the tower's last layer, for attention fusion) is returned only
when a caller asks for it.

Parameters: each handler's ``parameters`` (docs/configuration.md is generated from them).
"""
from __future__ import annotations

import importlib.util
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .calibration import image_pixels, text_tokens
from .errors import ConfigError
from .handler import Handler, InputSpec
from .hardware import has_bf16_units, this_cpu_flags
from .image_preprocess import ImagePreprocessConfig, ImagePreprocessor
from .int8 import CALIBRATION_ROWS, CHECK_ROWS, DEFAULT_MIN_COSINE, default_cache_dir
from .openclip_models import CLIP_DOC_EXAMPLE, CLIP_PARAMETERS, ClipSpec, load_clip, torch_dtype
from .openvino_engine import ENGINES, Int8Settings, OpenVinoTower, _check_engine, _text_tower_type
from .params import ModelContext, Params
from .torch_towers import _patch_embedding_type, can_trim, encode_text, patch_embedding_as_matmul, run_sequence_first  # noqa: F401


@dataclass(frozen=True)
class Int8Options:
    """precision int8: the cosine floor against fp32 and where the quantised graph is cached ("" = default)."""

    min_cosine: float = DEFAULT_MIN_COSINE
    cache_dir: str = ""


@dataclass(frozen=True)
class ImageEncoderConfig:
    spec: ClipSpec
    engine: str = "torch"
    torch_threads: int = 0
    decoding: ImagePreprocessConfig | None = None  # decode_images: image_preprocess's settings
    int8: Int8Options = Int8Options()


@dataclass(frozen=True)
class TextEncoderConfig:
    spec: ClipSpec
    engine: str = "torch"
    torch_threads: int = 0
    trim_text_tokens: bool = True
    int8: Int8Options = Int8Options()


def _setup_torch(threads: int) -> None:
    if threads:
        import torch

        torch.set_num_threads(threads)


def _parse_engine(context: ModelContext, params: Params) -> str:
    engine = params.choice("engine", "torch", ENGINES)
    _check_engine(engine, context.torch_device, context.model_name)  # also when validated offline
    return engine


def _parse_int8(context: ModelContext, params: Params, spec: ClipSpec, engine: str) -> Int8Options:
    """The int8 options; precision checks that need the engine (int8) or the machine (bf16 units)."""
    who = f"model '{context.model_name}': "
    if spec.precision == "int8":
        _check_int8_engine(spec, engine, who)
        if importlib.util.find_spec("nncf") is None:
            raise ConfigError(f"{who}precision 'int8' needs NNCF: pip install nncf==3.4.0 (scripts/setup.sh does)")
    elif spec.precision == "bf16" and context.torch_device == "cpu" and not has_bf16_units(this_cpu_flags()):
        log.warning("%sprecision 'bf16' on a CPU without bf16 units (AMX / AVX512-BF16) is emulated and ~10x "
                    "slower than fp32; precision 'auto' picks fp32 here", who)
    return Int8Options(params.float("int8_min_cosine", DEFAULT_MIN_COSINE, minimum=0.0, maximum=1.0),
                       params.str("int8_cache_dir", ""))


def _check_int8_engine(spec: ClipSpec, engine: str, who: str = "") -> None:
    if spec.precision == "int8" and engine != "openvino":
        raise ConfigError(f"{who}precision 'int8' needs engine 'openvino' (NNCF quantises the OpenVINO graph)")


def _int8_settings(spec: ClipSpec, options: Int8Options, what: str, calibration, check) -> Int8Settings | None:
    if spec.precision != "int8":
        return None
    return Int8Settings(calibration, check, Path(options.cache_dir) if options.cache_dir else default_cache_dir(),
                        options.min_cosine, what)


log = logging.getLogger("mmfuse")
_SEQUENCE_OUTPUTS = ("EMBEDDING", "SEQUENCE", "SEQUENCE_MASK")
THREADS_PARAMETER = "intra-op threads per instance (0: torch's default); with engine openvino, its inference threads"
INT8_PARAMETERS = {
    "int8_min_cosine": "precision int8: the lowest cosine against the fp32 tower, on generated inputs, that may serve; "
                       "below it the model fails to load with the figure (default 0.99)",
    "int8_cache_dir": "precision int8: where the quantised graph is cached, keyed by the weights' hash (default "
                      "$MMFUSE_CACHE_DIR or ~/.cache/mmfuse); the first load calibrates (~12 s for ViT-B-32 on 2 cores)",
}


def _normalised(pooled: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(pooled, axis=-1, keepdims=True)
    return (pooled / np.maximum(norms, 1e-12)).astype(np.float32)  # as torch's F.normalize


def _scatter(valid: np.ndarray, values: np.ndarray, rows: int) -> np.ndarray:
    out = np.zeros((rows,) + values.shape[1:], dtype=np.float32)
    out[valid] = values
    return out


class ImageEncoder(Handler):
    """PIXELS [B,3,H,W] + VALID [B,1] -> EMBEDDING [B,D] (+ SEQUENCE [B,T,W], SEQUENCE_MASK [B,T] on request)."""

    name = "image_encoder"
    metrics_labels = ("image", "encode")
    parameters = {
        **CLIP_PARAMETERS,
        "engine": "torch, or openvino: the same open_clip tower traced and compiled by OpenVINO's CPU plugin at "
                  "load (fp32 or bf16, KIND_CPU only)",
        "torch_threads": THREADS_PARAMETER,
        **INT8_PARAMETERS,
        "decode_images": "true: the encoder takes IMAGE (encoded bytes), decodes as image_preprocess would (its "
                         "parameters below apply) and answers VALID and STATUS too: one process instead of two",
        **{k: v for k, v in ImagePreprocessor.parameters.items() if k not in CLIP_PARAMETERS},
    }
    doc_examples = (CLIP_DOC_EXAMPLE, {**CLIP_DOC_EXAMPLE, "decode_images": "true"})

    def __init__(self, spec: ClipSpec, device: str = "cpu", engine: str = "torch", threads: int = 0,
                 int8: Int8Options = Int8Options()):
        _check_engine(engine, device)
        _check_int8_engine(spec, engine)
        self.config = ImageEncoderConfig(spec, engine, threads, int8=int8)
        model = load_clip(spec, device)
        self.visual = model.visual  # the text tower is dropped with `model`
        self.visual.output_tokens = True
        self.fast_patch_embedding = patch_embedding_as_matmul(self.visual)
        self.device = device
        self.dtype = torch_dtype(spec.precision)
        self.embed_dim = int(spec.model_config()["embed_dim"])
        size = self.visual.image_size
        size = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
        self.engine = engine
        self.openvino = None
        if engine == "openvino":
            import torch

            int8_settings = _int8_settings(
                spec, int8, "image tower", lambda: [p[None] for p in image_pixels(spec, CALIBRATION_ROWS)],
                lambda: [image_pixels(spec, CHECK_ROWS, seed=5000)])
            self.openvino = OpenVinoTower(self.visual.float().eval(), torch.zeros((2, 3) + tuple(size)),
                                          (-1, 3) + tuple(size), spec.precision, threads, int8_settings)
            self.visual = None  # OpenVINO holds its own copy of the weights
        _, probe = self.encode(np.zeros((1, 3) + size, np.float32))  # warm-up; learns the sequence shape
        self.sequence_shape = probe.shape[1:]

    @classmethod
    def parse(cls, context: ModelContext, params: Params) -> ImageEncoderConfig:
        spec, engine = ClipSpec.from_params(params, context), _parse_engine(context, params)
        decoding = ImagePreprocessor.parse(context, params) if params.bool("decode_images", False) else None
        return ImageEncoderConfig(spec, engine, params.int("torch_threads", 0, minimum=0), decoding,
                                  _parse_int8(context, params, spec, engine))

    @classmethod
    def input_specs(cls, config: ImageEncoderConfig) -> tuple[InputSpec, ...]:
        if config.decoding is not None:
            return (InputSpec("IMAGE", "O", row_rank=1),)
        return (InputSpec("PIXELS", "f", row_rank=3), InputSpec("VALID", "b", optional=True))

    @classmethod
    def output_names(cls, config: ImageEncoderConfig) -> tuple[str, ...]:
        return _SEQUENCE_OUTPUTS + (("VALID", "STATUS") if config.decoding is not None else ())

    @classmethod
    def build(cls, context: ModelContext, config: ImageEncoderConfig) -> ImageEncoder:
        _setup_torch(config.torch_threads)
        encoder = cls(config.spec, context.torch_device, engine=config.engine, threads=config.torch_threads,
                      int8=config.int8)
        if config.decoding is None:
            return encoder
        return DecodingImageEncoder(ImagePreprocessor.build(context, config.decoding), encoder)

    def encode(self, pixels: np.ndarray, sequence: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
        """(L2-normalised pooled [B,D], token sequence [B,T,W] or None) as float32 numpy arrays.

        The pixels go to the device once, in the compute precision; only what is asked for comes back
        (the token sequence is 30 to 100 times the size of the embedding: converted only when needed).
        """
        import torch

        if self.openvino is not None:
            pooled, tokens = self.openvino(np.asarray(pixels, dtype=np.float32))
            return _normalised(pooled), (tokens.astype(np.float32) if sequence else None)
        with torch.inference_mode():
            x = torch.from_numpy(pixels).to(self.device, self.dtype)
            pooled, tokens = self.visual(x)
            pooled = torch.nn.functional.normalize(pooled.float(), dim=-1)
            return pooled.cpu().numpy(), (tokens.float().cpu().numpy() if sequence else None)

    def __call__(self, batch: Mapping[str, np.ndarray], requested: frozenset[str]) -> dict[str, np.ndarray]:
        pixels = batch["PIXELS"]
        rows = pixels.shape[0]
        valid = batch["VALID"].reshape(rows) if "VALID" in batch else np.ones(rows, dtype=bool)
        wants_sequence = "SEQUENCE" in requested or "SEQUENCE_MASK" in requested
        if valid.any():
            rows_in = pixels if valid.all() else pixels[valid]  # no copy when every row is valid
            pooled, sequence = self.encode(np.ascontiguousarray(rows_in, dtype=np.float32), wants_sequence)
        else:
            pooled = np.zeros((0, self.embed_dim), np.float32)
            sequence = np.zeros((0,) + self.sequence_shape, np.float32)
        out = {"EMBEDDING": _scatter(valid, pooled, rows)}
        if wants_sequence:
            out["SEQUENCE"] = _scatter(valid, sequence, rows)
            out["SEQUENCE_MASK"] = np.repeat(valid[:, None], sequence.shape[1], axis=1)
        return out


class DecodingImageEncoder(ImageEncoder):
    """IMAGE bytes [B,1] -> EMBEDDING (+ SEQUENCE, SEQUENCE_MASK), VALID, STATUS: image_preprocess and
    image_encoder in one handler (``decode_images``), with their outputs unchanged.

    Measured (README "Performance"): in one process per instance, a 600 KB float32 pixel tensor per image no
    longer travels preprocessing -> Triton -> encoder, and each instance decodes its own batch before running
    it instead of sharing the cores with a separate decoding process.
    """

    def __init__(self, preprocessor: ImagePreprocessor, encoder: ImageEncoder):
        self.preprocessor = preprocessor
        self.encoder = encoder
        self.config = ImageEncoderConfig(encoder.config.spec, encoder.config.engine, encoder.config.torch_threads,
                                         preprocessor.config, encoder.config.int8)

    def __call__(self, batch: Mapping[str, np.ndarray], requested: frozenset[str]) -> dict[str, np.ndarray]:
        decoded = self.preprocessor(batch, frozenset({"PIXELS", "VALID", "STATUS"}))
        out = self.encoder({"PIXELS": decoded["PIXELS"], "VALID": decoded["VALID"]}, requested)
        out["VALID"], out["STATUS"] = decoded["VALID"], decoded["STATUS"]
        return out

    def close(self) -> None:
        self.preprocessor.close()


class TextEncoder(Handler):
    """TOKENS int64 [B,L] + VALID [B,1] -> EMBEDDING [B,D] (+ SEQUENCE [B,L,W], SEQUENCE_MASK [B,L] on request)."""

    name = "text_encoder"
    metrics_labels = ("text", "encode")
    parameters = {
        **CLIP_PARAMETERS,
        "engine": "torch, or openvino: one traced graph for every trimmed length (KIND_CPU only)",
        "torch_threads": THREADS_PARAMETER,
        **INT8_PARAMETERS,
        "trim_text_tokens": "run the transformer only up to the longest real caption of the batch (exact under the "
                            "causal mask)",
    }
    doc_examples = (CLIP_DOC_EXAMPLE,)

    def __init__(self, spec: ClipSpec, device: str = "cpu", trim: bool = True, engine: str = "torch",
                 threads: int = 0, int8: Int8Options = Int8Options()):
        _check_engine(engine, device)
        _check_int8_engine(spec, engine)
        self.config = TextEncoderConfig(spec, engine, threads, trim, int8)
        model = load_clip(spec, device)
        model.visual = None  # the image tower is not needed here
        self.sequence_first = run_sequence_first(model)
        self.model = model
        self.device = device
        self.trim = trim
        self.trimmable = can_trim(model)
        self.embed_dim = int(spec.model_config()["embed_dim"])
        self.width = int(model.ln_final.normalized_shape[0]) if hasattr(model, "ln_final") else self.embed_dim
        self.engine = engine
        self.openvino = None
        if engine == "openvino":
            import torch

            # One graph for every trimmed length: traced at 8 tokens, the length dimension left dynamic.
            example = torch.zeros((2, min(8, int(model.context_length))), dtype=torch.int64)
            int8_settings = _int8_settings(spec, int8, "text tower", lambda: text_tokens(spec, CALIBRATION_ROWS),
                                           lambda: text_tokens(spec, CHECK_ROWS, offset=CALIBRATION_ROWS))
            self.openvino = OpenVinoTower(_text_tower_type()(model.float().eval()), example, (-1, -1),
                                          spec.precision, threads, int8_settings)
            self.model = None  # OpenVINO holds its own copy of the weights

    @classmethod
    def parse(cls, context: ModelContext, params: Params) -> TextEncoderConfig:
        spec, engine = ClipSpec.from_params(params, context), _parse_engine(context, params)
        return TextEncoderConfig(spec, engine, params.int("torch_threads", 0, minimum=0),
                                 params.bool("trim_text_tokens", True), _parse_int8(context, params, spec, engine))

    @classmethod
    def input_specs(cls, config: TextEncoderConfig) -> tuple[InputSpec, ...]:
        return (InputSpec("TOKENS", "i", row_rank=1), InputSpec("VALID", "b", optional=True))

    @classmethod
    def output_names(cls, config: TextEncoderConfig) -> tuple[str, ...]:
        return _SEQUENCE_OUTPUTS

    @classmethod
    def build(cls, context: ModelContext, config: TextEncoderConfig) -> TextEncoder:
        _setup_torch(config.torch_threads)
        return cls(config.spec, context.torch_device, trim=config.trim_text_tokens, engine=config.engine,
                   threads=config.torch_threads, int8=config.int8)

    def encode(self, tokens: np.ndarray, sequence: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
        """(L2-normalised pooled [B,D], token sequence [B,L',W] or None); L' is the trimmed length."""
        import torch

        if self.trim and self.trimmable and len(tokens):
            # Cut on the host, before the upload: no device round trip to learn the length.
            tokens = tokens[:, : int(tokens.argmax(axis=1).max()) + 1]
        if self.openvino is not None:
            pooled, states = self.openvino(np.asarray(tokens, dtype=np.int64))
            return _normalised(pooled), (states.astype(np.float32) if sequence else None)
        with torch.inference_mode():
            pooled, states = encode_text(self.model, torch.from_numpy(tokens).to(self.device), trim=False)
            pooled = torch.nn.functional.normalize(pooled.float(), dim=-1)
            return pooled.cpu().numpy(), (states.float().cpu().numpy() if sequence else None)

    def __call__(self, batch: Mapping[str, np.ndarray], requested: frozenset[str]) -> dict[str, np.ndarray]:
        tokens = batch["TOKENS"]
        rows, length = tokens.shape
        valid = batch["VALID"].reshape(rows) if "VALID" in batch else np.ones(rows, dtype=bool)
        wants_sequence = "SEQUENCE" in requested or "SEQUENCE_MASK" in requested
        if valid.any():
            rows_in = tokens if valid.all() else tokens[valid]
            pooled, sequence = self.encode(np.ascontiguousarray(rows_in, dtype=np.int64), wants_sequence)
        else:
            pooled, sequence = np.zeros((0, self.embed_dim), np.float32), np.zeros((0, length, self.width), np.float32)
        out = {"EMBEDDING": _scatter(valid, pooled, rows)}
        if wants_sequence:
            # Positions after a row's end-of-text token are padding: zero them, so that a row's
            # SEQUENCE never depends on the other captions of its batch; SEQUENCE_MASK marks them.
            real = np.arange(length)[None, :] <= tokens.argmax(axis=1)[:, None]
            padded = np.zeros((sequence.shape[0], length, sequence.shape[2]), np.float32)
            padded[:, : sequence.shape[1]] = sequence
            padded *= real[valid][:, :, None]
            out["SEQUENCE"] = _scatter(valid, padded, rows)
            out["SEQUENCE_MASK"] = real & valid[:, None]
        return out
