"""precision ``int8``: post-training quantisation of an open_clip tower by NNCF on OpenVINO, calibrated on
generated inputs, checked against fp32 before it serves, cached on disk.

* Calibration: the deterministic photo-like JPEGs and captions of ``calibration`` (the ones ``mmfuse bench``
  sends), put through the model's own preprocessing (open_clip's transform, its tokenizer). No user data.
* The check: the quantised tower and the fp32 tower embed held-out generated inputs; the lowest cosine of the
  L2-normalised embeddings must reach ``min_cosine`` (parameter ``int8_min_cosine``, default 0.99), else the
  model fails to load with the figure in the error: a quantisation that hurts is never served quietly.
* The cache: quantising ViT-B-32 takes ~12 s on 2 cores; the quantised graph is saved under
  ``cache_dir/openvino-int8/KEY`` where KEY hashes the tower's weights, its input shape, the calibration
  recipe, the overflow fix (7-bit weights where the CPU has no VNNI: ``needs_overflow_fix``) and the
  openvino/nncf versions, so every instance and restart after the first reads it back. The check runs on
  every load, cached or not.
  An unwritable cache folder only costs the time.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .errors import ConfigError
from .hardware import INT8_DOT_FLAGS, this_cpu_flags

log = logging.getLogger("mmfuse")
RECIPE = "nncf-ptq-transformer-v1"  # change when calibration inputs or quantisation settings change
DEFAULT_MIN_COSINE = 0.99
CALIBRATION_ROWS = 32
CHECK_ROWS = 8


@dataclass(frozen=True)
class QuantisationReport:
    min_cosine: float
    mean_cosine: float
    calibration_rows: int
    check_rows: int
    seconds: float
    cached: bool
    path: str = ""

    def as_dict(self) -> dict:
        return asdict(self)


def default_cache_dir() -> Path:
    root = os.environ.get("MMFUSE_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "mmfuse")
    return Path(root)


def needs_overflow_fix(flags: frozenset[str] | None = None, environ=os.environ) -> bool:
    """Whether the int8 kernels here lack a one-instruction int8 dot product (VNNI, AMX-INT8): AVX2's u8 x s8
    multiply-add saturates its 16-bit sums, so the weights are quantised to 7 bits (NNCF's overflow fix).
    Measured (ViT-B-32 image tower, oneDNN held to AVX2 with ONEDNN_MAX_CPU_ISA=AVX2): cosine vs fp32 0.977
    without the fix (refused), 0.9992 with it."""
    isa = environ.get("ONEDNN_MAX_CPU_ISA", "").upper()
    if isa and not any(level in isa for level in ("VNNI", "AMX", "AVX512_CORE_BF16", "AVX512_CORE_FP16", "ALL")):
        return True
    return not (INT8_DOT_FLAGS & (this_cpu_flags() if flags is None else flags))


def weights_key(module, shape: tuple[int, ...], kind: str) -> str:
    """A content hash of the tower's weights, its input shape and what quantisation depends on."""
    import nncf
    import openvino as ov

    recipe = [RECIPE, kind, list(shape), ov.__version__, nncf.__version__, needs_overflow_fix()]
    digest = hashlib.sha256(json.dumps(recipe).encode())
    for name, tensor in module.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:32]


def _normalised(values: np.ndarray) -> np.ndarray:
    values = np.asarray(values, np.float64)
    return values / np.maximum(np.linalg.norm(values, axis=-1, keepdims=True), 1e-12)


def check_cosine(reference, quantised, inputs: list[np.ndarray]) -> tuple[float, float]:
    """(lowest, mean) cosine of the pooled outputs of two compiled OpenVINO models on ``inputs``."""
    cos = []
    for values in inputs:
        a = _normalised(reference([values])[0])
        b = _normalised(quantised([values])[0])
        cos.extend((a * b).sum(-1).tolist())
    return float(min(cos)), float(np.mean(cos))


def _save(model, folder: Path) -> None:
    """Write the quantised model to ``folder`` atomically (a rename); another instance may win the race."""
    import shutil

    import openvino as ov

    tmp = None
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=".tmp-"))
        ov.save_model(model, tmp / "model.xml", compress_to_fp16=False)
        os.rename(tmp, folder)
    except OSError as error:  # written first by another instance, or a read-only folder
        if not (folder / "model.xml").is_file():
            log.warning("int8 cache not written (%s): %s", folder, error)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def quantise(model, calibration: Callable[[], list[np.ndarray]], check: list[np.ndarray], *, key: str,
             cache_dir: Path | None, min_cosine: float = DEFAULT_MIN_COSINE, what: str = "tower"):
    """The int8 OpenVINO model of ``model`` (fp32, converted) and its report; from the cache where there."""
    import openvino as ov

    core = ov.Core()
    started = time.perf_counter()
    cached = None
    if cache_dir is not None:
        cached = Path(cache_dir) / "openvino-int8" / key / "model.xml"
    if cached is not None and cached.is_file():
        quantised, from_cache = core.read_model(cached), True
    else:
        import nncf

        nncf_logger = logging.getLogger("nncf")
        nncf_logger.setLevel(logging.WARNING)
        calibration = calibration()
        fix = nncf.OverflowFix.ENABLE if needs_overflow_fix() else nncf.OverflowFix.FIRST_LAYER
        quantised = nncf.quantize(model, nncf.Dataset(calibration), model_type=nncf.ModelType.TRANSFORMER,
                                  subset_size=len(calibration),
                                  advanced_parameters=nncf.AdvancedQuantizationParameters(overflow_fix=fix))
        from_cache = False
    config = {"INFERENCE_PRECISION_HINT": "f32", "NUM_STREAMS": 1}
    low, mean = check_cosine(core.compile_model(model, "CPU", config), core.compile_model(quantised, "CPU", config),
                             check)
    if low < min_cosine:
        raise ConfigError(f"precision 'int8': the quantised {what} reaches a cosine of {low:.4f} against fp32 on "
                          f"generated inputs (mean {mean:.4f}), below int8_min_cosine {min_cosine}; serve fp32 or "
                          f"bf16, or lower int8_min_cosine if that loss is acceptable")
    if cached is not None and not from_cache:
        _save(quantised, cached.parent)
    rows = 0 if from_cache else len(calibration)
    report = QuantisationReport(low, mean, rows, sum(len(c) for c in check),
                                time.perf_counter() - started, from_cache, str(cached or ""))
    log.info("int8 %s: cosine vs fp32 min %.5f mean %.5f (%s, %.1f s)", what, low, mean,
             "cached" if from_cache else f"calibrated on {rows} generated inputs", report.seconds)
    return quantised, report
