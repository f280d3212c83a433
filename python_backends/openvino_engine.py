"""The encoders' ``engine`` choice and the OpenVINO engine: an open_clip tower traced once and compiled by
OpenVINO's CPU plugin. openvino and torch are imported when a tower is built: importing this module loads nothing."""
from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import ConfigError
from .torch_towers import encode_text

ENGINES = ("torch", "openvino")


@dataclass(frozen=True)
class Int8Settings:
    """What precision int8 needs besides the tower: makers of its generated calibration inputs (called only when
    the cache misses) and check inputs, where the quantised graph is cached, the cosine floor."""

    calibration: Callable[[], list] = list
    check: Callable[[], list] = list
    cache_dir: Path | None = None
    min_cosine: float = 0.99
    what: str = "tower"


def _check_engine(engine: str, device: str, model: str = "") -> None:
    who = f"model '{model}': " if model else ""
    if engine not in ENGINES:
        raise ConfigError(f"{who}engine {engine!r}: expected one of {', '.join(ENGINES)}")
    if engine == "openvino" and device != "cpu":
        raise ConfigError(f"{who}engine 'openvino' runs on a KIND_CPU instance; use engine 'torch' on a GPU")


class OpenVinoTower:
    """An open_clip tower traced once and compiled by OpenVINO's CPU plugin: input -> (pooled, tokens).

    The same module and weights as the torch path; OpenVINO fuses the tower's elementwise work (layer
    norms, GELU, attention's softmax) into its matrix products. ``shape`` is the input's shape with -1 for
    the dimensions that stay dynamic (the batch; the text's trimmed length). Measured on ViT-B-32, one
    thread, on an AVX512-BF16 CPU: image tower bf16 49.6-52.4 img/s against torch's 43.8-45, fp32 25.6-27.1
    against 12.1; text tower (64 short captions trimmed to 11 tokens) bf16 490 captions/s against 429,
    fp32 261 against ~116. Cosine vs torch fp32 >= 0.9999 (tests check each).
    """

    def __init__(self, module, example, shape: tuple[int, ...], precision: str, threads: int,
                 int8: Int8Settings | None = None):
        import openvino as ov
        import torch

        if precision not in ("fp32", "bf16", "int8"):
            raise ConfigError(f"engine 'openvino' runs fp32, bf16 or int8 on the CPU, not {precision!r}")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # TorchScript deprecation and tracer notes
            # Traced with autograd on: nn.MultiheadAttention then records its plain ops (its fused inference-only
            # kernel is not an op OpenVINO converts).
            traced = torch.jit.trace(module, example, check_trace=False)
        model = ov.convert_model(traced)
        model.reshape({model.inputs[0]: ov.PartialShape(list(shape))})
        self.int8_report = None
        if precision == "int8":
            from .int8 import quantise, weights_key

            int8 = int8 or Int8Settings()
            model, self.int8_report = quantise(
                model, int8.calibration, int8.check(), key=weights_key(module, shape, int8.what),
                cache_dir=int8.cache_dir, min_cosine=int8.min_cosine, what=int8.what)
        # No CPU pinning: OpenVINO pins its threads by default, and two single-thread instances (two Triton
        # model processes) were pinned to the same core (measured: 1.12 of 2 cores busy, 44.7 img/s).
        config = {"INFERENCE_PRECISION_HINT": "bf16" if precision == "bf16" else "f32",
                  "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1, "ENABLE_CPU_PINNING": False}
        if threads:
            config["INFERENCE_NUM_THREADS"] = threads
        self.request = ov.Core().compile_model(model, "CPU", config).create_infer_request()

    def __call__(self, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        out = self.request.infer([np.ascontiguousarray(values)])
        return np.asarray(out[0]), np.asarray(out[1])


@functools.cache
def _text_tower_type():
    """The module class, made on first use: this file does not import torch at import time."""
    import torch

    class TextTower(torch.nn.Module):
        """tokens [B,L] -> (projected pooled [B,D], last-layer sequence [B,L,W]) of an open_clip model, for tracing:
        the causal mask is cut to L inside, so one traced graph serves every trimmed length."""

        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, tokens):
            return encode_text(self.model, tokens, trim=False)

    return TextTower
