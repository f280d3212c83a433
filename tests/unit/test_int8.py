"""precision int8: NNCF post-training quantisation on OpenVINO, within tolerance of fp32, cached, refused where
it would hurt (the tiny shipped architecture, random weights; the ViT-B-32 figures come from mmfuse bench)."""
from __future__ import annotations

import numpy as np
import pytest

from mmfuse.serving.calibration import image_pixels, text_tokens
from mmfuse.serving.encoders import ImageEncoder, Int8Options, TextEncoder
from mmfuse.serving.errors import ConfigError
from mmfuse.serving.openclip_models import ClipSpec
from mmfuse.serving.params import ModelContext
from tests.unit.conftest import TINY, assert_names, cosine_rows, make_params

EMBEDDING = frozenset({"EMBEDDING"})
FP32 = ClipSpec(TINY, allow_random_init=True, seed=3)
INT8 = ClipSpec(TINY, allow_random_init=True, seed=3, precision="int8")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("int8-cache")


@pytest.fixture(scope="module")
def int8_image(cache):
    return ImageEncoder(INT8, engine="openvino", threads=1, int8=Int8Options(cache_dir=str(cache)))


@pytest.fixture(scope="module")
def int8_text(cache):
    return TextEncoder(INT8, engine="openvino", threads=1, int8=Int8Options(cache_dir=str(cache)))


def test_the_int8_image_tower_stays_within_tolerance_of_fp32(int8_image):
    report = int8_image.openvino.int8_report
    assert report.min_cosine >= 0.99 and report.calibration_rows == 32 and not report.cached
    pixels = image_pixels(FP32, 6, seed=777)  # generated images neither calibration nor the check saw
    reference = ImageEncoder(FP32)({"PIXELS": pixels}, EMBEDDING)["EMBEDDING"]
    served = int8_image({"PIXELS": pixels}, EMBEDDING)["EMBEDDING"]
    assert served.dtype == np.float32 and np.allclose(np.linalg.norm(served, axis=-1), 1.0, atol=1e-5)
    assert cosine_rows(served, reference).min() >= 0.99
    assert not np.allclose(served, reference, atol=1e-6)  # it did quantise


def test_the_int8_text_tower_stays_within_tolerance_of_fp32_at_every_trimmed_length(int8_text):
    assert int8_text.openvino.int8_report.min_cosine >= 0.99
    rows = text_tokens(FP32, 6, offset=60)
    width = max(r.shape[1] for r in rows)
    tokens = np.zeros((len(rows), 77), np.int64)
    for i, row in enumerate(rows):
        tokens[i, : row.shape[1]] = row[0]
    assert width < 77  # trimmed in the batch to its longest caption
    reference = TextEncoder(FP32)({"TOKENS": tokens}, EMBEDDING)["EMBEDDING"]
    served = int8_text({"TOKENS": tokens}, EMBEDDING)["EMBEDDING"]
    assert cosine_rows(served, reference).min() >= 0.99


def test_a_second_build_reads_the_quantised_graph_from_the_cache(int8_image, cache):
    again = ImageEncoder(INT8, engine="openvino", threads=1, int8=Int8Options(cache_dir=str(cache)))
    report = again.openvino.int8_report
    assert report.cached and report.calibration_rows == 0 and report.path.startswith(str(cache))
    pixels = image_pixels(FP32, 3, seed=99)
    np.testing.assert_allclose(again({"PIXELS": pixels}, EMBEDDING)["EMBEDDING"],
                               int8_image({"PIXELS": pixels}, EMBEDDING)["EMBEDDING"], atol=1e-6)
    other = ClipSpec(TINY, allow_random_init=True, seed=4, precision="int8")  # other weights, other key
    fresh = ImageEncoder(other, engine="openvino", threads=1, int8=Int8Options(cache_dir=str(cache)))
    assert not fresh.openvino.int8_report.cached


def test_a_quantisation_below_the_floor_is_refused_with_its_figure(cache):
    with pytest.raises(ConfigError) as info:
        ImageEncoder(INT8, engine="openvino", threads=1, int8=Int8Options(min_cosine=1.0, cache_dir=str(cache)))
    assert_names(info.value, "int8", "cosine", "int8_min_cosine", "1.0")


@pytest.mark.parametrize("raw, kind, fragments", [
    ({"precision": "int8"}, "CPU", ("int8", "engine", "openvino")),  # engine torch
    ({"precision": "int8", "engine": "openvino", "int8_min_cosine": "1.5"}, "CPU", ("int8_min_cosine",)),
    ({"precision": "int8"}, "GPU", ("int8", "KIND_CPU")),
])
def test_int8_settings_are_checked_when_parsed(raw, kind, fragments):
    params = make_params("image_encoder", model_name=TINY, allow_random_init="true", **raw)
    with pytest.raises(ConfigError) as info:
        ImageEncoder.parse(ModelContext("image_encoder", None, instance_kind=kind), params)
    assert_names(info.value, *fragments)


def test_int8_parameters_parse_from_a_repository(tmp_path):
    params = make_params("text_encoder", model_name=TINY, allow_random_init="true", precision="int8",
                         engine="openvino", int8_min_cosine="0.995", int8_cache_dir=str(tmp_path))
    config = TextEncoder.parse(ModelContext("text_encoder", None), params)
    params.reject_unknown()
    assert config.spec.precision == "int8" and config.int8 == Int8Options(0.995, str(tmp_path))


@pytest.mark.parametrize("name, isa, fix", [
    ("amx-xeon-dev-machine.txt", "", False),
    ("avx512-xeon-ice-lake.txt", "", False),  # AVX512-VNNI
    ("avx2-epyc-zen2.txt", "", True),  # no int8 dot product: 7-bit weights
    ("amx-xeon-dev-machine.txt", "AVX2", True),  # oneDNN held to AVX2 (how the AVX2 figures were measured)
    ("amx-xeon-dev-machine.txt", "AVX512_CORE_AMX", False),
])
def test_the_overflow_fix_follows_the_int8_instructions(name, isa, fix):
    from mmfuse.serving.hardware import cpu_model_and_flags
    from mmfuse.serving.int8 import needs_overflow_fix
    from tests.unit.test_auto import CPUINFO

    flags = cpu_model_and_flags(CPUINFO / name)[1]
    assert needs_overflow_fix(flags, {"ONEDNN_MAX_CPU_ISA": isa} if isa else {}) is fix
