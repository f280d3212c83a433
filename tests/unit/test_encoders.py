"""mmfuse.serving.encoders (and the weight loading of openclip_models) against open_clip run in-process."""
from __future__ import annotations

import numpy as np
import pytest

from mmfuse.serving.encoders import ImageEncoder, TextEncoder, encode_text
from mmfuse.serving.errors import ConfigError, WeightsError
from mmfuse.serving.openclip_models import ClipSpec, load_clip
from mmfuse.serving.params import ModelContext
from tests.unit.conftest import TINY, assert_names, cosine_rows, make_params

SEED = 3
CHECKPOINT_SEED = 1234  # not the default seed 0, not SEED
CAPTIONS = ["a cat", "an astronaut riding a horse on the moon in a photorealistic style", "x", "two dogs playing"]
EMBEDDING = frozenset({"EMBEDDING"})
BOTH = frozenset({"EMBEDDING", "SEQUENCE"})


def seeded_model(open_clip, seed: int):
    """The reference: what `torch.manual_seed(seed); open_clip.create_model(...)` builds in this process."""
    import torch

    torch.manual_seed(seed)
    return open_clip.create_model(TINY, pretrained=None).eval()


def random_pixels(rows: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((rows, 3, 64, 64)).astype(np.float32)


def reference_image(model, pixels: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model.encode_image(torch.from_numpy(pixels), normalize=True).numpy()


def reference_text(model, tokens: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model.encode_text(torch.from_numpy(tokens), normalize=True).numpy()


def assert_same_embeddings(got: np.ndarray, expected: np.ndarray, min_cosine: float = 0.9999) -> None:
    assert got.shape == expected.shape and got.dtype == np.float32
    cosines = cosine_rows(got, expected)
    assert cosines.min() >= min_cosine, cosines
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)


@pytest.fixture(scope="module")
def spec(open_clip_tiny) -> ClipSpec:
    return ClipSpec(TINY, allow_random_init=True, seed=SEED)


@pytest.fixture(scope="module")
def reference(open_clip_tiny):
    return seeded_model(open_clip_tiny, SEED)


@pytest.fixture(scope="module")
def image_encoder(spec) -> ImageEncoder:
    return ImageEncoder(spec)


@pytest.fixture(scope="module")
def text_encoder(spec) -> TextEncoder:
    return TextEncoder(spec)


@pytest.fixture(scope="module")
def tokens(tiny_tokenizer) -> np.ndarray:
    return tiny_tokenizer(CAPTIONS).numpy()


@pytest.fixture(scope="module")
def checkpoint(open_clip_tiny, tmp_path_factory):
    """A safetensors file of a model seeded with CHECKPOINT_SEED, and that model."""
    from safetensors.torch import save_file

    model = seeded_model(open_clip_tiny, CHECKPOINT_SEED)
    path = tmp_path_factory.mktemp("weights") / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path, model


# -- image -----------------------------------------------------------------------------------------------------
def test_image_embeddings_equal_open_clip(image_encoder, reference):
    pixels = random_pixels(4)
    out = image_encoder({"PIXELS": pixels}, EMBEDDING)
    assert set(out) == {"EMBEDDING"}
    assert_same_embeddings(out["EMBEDDING"], reference_image(reference, pixels))


def test_image_invalid_rows_are_zeros_and_do_not_affect_valid_rows(image_encoder, reference):
    pixels = random_pixels(5, seed=1)
    pixels[1] = np.nan  # an invalid row may hold anything
    valid = np.array([[True], [False], [True], [False], [True]])
    out = image_encoder({"PIXELS": pixels, "VALID": valid}, BOTH)
    assert not out["EMBEDDING"][[1, 3]].any() and not out["SEQUENCE"][[1, 3]].any()
    assert_same_embeddings(out["EMBEDDING"][[0, 2, 4]], reference_image(reference, pixels[[0, 2, 4]]))
    alone = image_encoder({"PIXELS": pixels[[2]]}, EMBEDDING)["EMBEDDING"]
    np.testing.assert_allclose(out["EMBEDDING"][2], alone[0], atol=1e-6)


def test_image_all_rows_invalid(image_encoder):
    out = image_encoder({"PIXELS": random_pixels(2), "VALID": np.zeros((2, 1), bool)}, BOTH)
    assert out["EMBEDDING"].shape == (2, 64) and not out["EMBEDDING"].any()
    assert out["SEQUENCE"].shape == (2,) + image_encoder.sequence_shape and not out["SEQUENCE"].any()


def test_image_sequence_only_when_requested(image_encoder):
    pixels = random_pixels(3)
    assert "SEQUENCE" not in image_encoder({"PIXELS": pixels}, EMBEDDING)
    sequence = image_encoder({"PIXELS": pixels}, BOTH)["SEQUENCE"]
    assert sequence.shape == (3, 16, 64)  # (64/16)^2 patch tokens of width 64
    assert sequence.dtype == np.float32


# -- text ------------------------------------------------------------------------------------------------------
def test_text_embeddings_equal_open_clip(text_encoder, reference, tokens):
    out = text_encoder({"TOKENS": tokens}, EMBEDDING)
    assert set(out) == {"EMBEDDING"}
    assert_same_embeddings(out["EMBEDDING"], reference_text(reference, tokens))


def test_text_invalid_rows_are_zeros_and_do_not_affect_valid_rows(text_encoder, reference, tokens):
    garbage = np.full_like(tokens, 49407)  # invalid rows may hold anything, even an all-EOT sequence
    batch = np.concatenate([tokens[:2], garbage[:1], tokens[2:]])
    valid = np.array([[True], [True], [False], [True], [True]])
    out = text_encoder({"TOKENS": batch, "VALID": valid}, BOTH)
    assert not out["EMBEDDING"][2].any() and not out["SEQUENCE"][2].any()
    assert_same_embeddings(out["EMBEDDING"][[0, 1, 3, 4]], reference_text(reference, tokens))


def test_text_all_rows_invalid(text_encoder, tokens):
    out = text_encoder({"TOKENS": tokens, "VALID": np.zeros((4, 1), bool)}, BOTH)
    assert out["EMBEDDING"].shape == (4, 64) and not out["EMBEDDING"].any()
    assert out["SEQUENCE"].shape == (4, 77, 64) and not out["SEQUENCE"].any()


def test_text_sequence_only_when_requested(text_encoder, tokens):
    assert "SEQUENCE" not in text_encoder({"TOKENS": tokens}, EMBEDDING)
    out = text_encoder({"TOKENS": tokens}, BOTH)
    assert out["SEQUENCE"].shape == (4, 77, 64)


def test_trimmed_text_equals_padded_and_open_clip(reference, tokens):
    import torch

    text = torch.from_numpy(tokens)
    lengths = tokens.argmax(axis=1) + 1
    assert len(set(lengths)) == len(CAPTIONS), "captions of different lengths"
    with torch.no_grad():
        trimmed, trimmed_sequence = encode_text(reference, text, trim=True)
        padded, padded_sequence = encode_text(reference, text, trim=False)
        expected = reference.encode_text(text)
    assert trimmed_sequence.shape[1] == lengths.max() < padded_sequence.shape[1] == 77
    np.testing.assert_allclose(trimmed.numpy(), padded.numpy(), atol=1e-5)
    np.testing.assert_allclose(trimmed.numpy(), expected.numpy(), atol=1e-5)
    for row, length in enumerate(lengths):  # every real token's state is the same under the causal mask
        np.testing.assert_allclose(trimmed_sequence[row, :length], padded_sequence[row, :length], atol=1e-5)


def test_text_sequence_of_a_row_does_not_depend_on_the_batch(text_encoder, tokens):
    short = tokens[[0]]  # "a cat"
    alone = text_encoder({"TOKENS": short}, BOTH)["SEQUENCE"][0]
    batched = text_encoder({"TOKENS": tokens}, BOTH)["SEQUENCE"][0]
    np.testing.assert_allclose(alone, batched, atol=1e-5)


def test_text_embedding_of_a_row_does_not_depend_on_the_batch(text_encoder, tokens):
    batched = text_encoder({"TOKENS": tokens}, EMBEDDING)["EMBEDDING"]
    for row in range(len(tokens)):
        alone = text_encoder({"TOKENS": tokens[[row]]}, EMBEDDING)["EMBEDDING"][0]
        np.testing.assert_allclose(alone, batched[row], atol=1e-5)


def test_untrimmed_encoder_equals_trimmed(spec, text_encoder, tokens):
    untrimmed = TextEncoder(spec, trim=False)
    np.testing.assert_allclose(
        untrimmed({"TOKENS": tokens}, EMBEDDING)["EMBEDDING"],
        text_encoder({"TOKENS": tokens}, EMBEDDING)["EMBEDDING"], atol=1e-5)


# -- weights -----------------------------------------------------------------------------------------------------
def test_no_weights_without_allow_random_init(open_clip_tiny):
    with pytest.raises(WeightsError) as info:
        load_clip(ClipSpec(TINY))
    assert_names(info.value, TINY, "'pretrained'", "checkpoint file", "'allow_random_init'", "'true'")


def test_no_weights_from_repository_style_params(open_clip_tiny):
    params = make_params("image_encoder", model_name=TINY, pretrained="", allow_random_init="false")
    with pytest.raises(WeightsError) as info:
        ImageEncoder.from_parameters(ModelContext("image_encoder", model_dir=None), params)
    assert_names(info.value, "allow_random_init")


@pytest.mark.parametrize("model_name, known", [("ViT-B-32", "laion2b_s34b_b79k"), (TINY, "none")])
def test_unknown_pretrained_tag_lists_known_tags(open_clip_tiny, model_name, known):
    with pytest.raises(ConfigError) as info:
        ClipSpec(model_name, pretrained="laion9b_nonexistent").validate(ModelContext("image_encoder", None))
    assert_names(info.value, "image_encoder", "'laion9b_nonexistent'", model_name, "known tags", known)


def test_unknown_model_name(open_clip_tiny):
    with pytest.raises(ConfigError) as info:
        ClipSpec("ViT-Q-99").validate()
    assert_names(info.value, "'ViT-Q-99'", "model_config_file")


def test_safetensors_checkpoint_gives_that_models_embeddings(checkpoint, reference, tokens):
    path, model = checkpoint
    spec = ClipSpec(TINY, pretrained=str(path))
    assert spec.is_checkpoint_file
    pixels = random_pixels(3, seed=2)
    image = ImageEncoder(spec)({"PIXELS": pixels}, EMBEDDING)["EMBEDDING"]
    text = TextEncoder(spec)({"TOKENS": tokens}, EMBEDDING)["EMBEDDING"]
    assert_same_embeddings(image, reference_image(model, pixels))
    assert_same_embeddings(text, reference_text(model, tokens))
    assert cosine_rows(image, reference_image(reference, pixels)).max() < 0.99  # not the seeded default


def test_relative_checkpoint_path_resolves_against_the_model_dir(checkpoint, tmp_path):
    path, model = checkpoint
    model_dir = tmp_path / "image_encoder"
    (model_dir / "weights").mkdir(parents=True)
    (model_dir / "weights" / "tiny.safetensors").write_bytes(path.read_bytes())
    context = ModelContext("image_encoder", model_dir)
    params = make_params("image_encoder", model_name=TINY, pretrained="weights/tiny.safetensors")
    encoder = ImageEncoder.from_parameters(context, params)
    params.reject_unknown()
    pixels = random_pixels(2, seed=5)
    assert_same_embeddings(encoder({"PIXELS": pixels}, EMBEDDING)["EMBEDDING"], reference_image(model, pixels))


def test_missing_checkpoint_file(open_clip_tiny, tmp_path):
    missing = tmp_path / "nowhere" / "tiny.safetensors"
    with pytest.raises(WeightsError) as info:
        load_clip(ClipSpec(TINY, pretrained=str(missing)))
    assert_names(info.value, str(missing), TINY)


def test_checkpoint_of_another_architecture_is_a_weights_error(open_clip_tiny, tmp_path):
    import torch
    from safetensors.torch import save_file

    path = tmp_path / "wrong.safetensors"
    save_file({"visual.proj": torch.zeros(3, 3)}, str(path))
    with pytest.raises(WeightsError) as info:
        load_clip(ClipSpec(TINY, pretrained=str(path)))
    assert_names(info.value, str(path), TINY)


# -- precision ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("context", [None, ModelContext("image_encoder", None, instance_kind="CPU")])
def test_fp16_on_a_cpu_instance_is_a_config_error(open_clip_tiny, context):
    with pytest.raises(ConfigError) as info:
        ClipSpec(TINY, allow_random_init=True, precision="fp16").validate(context)
    assert_names(info.value, "fp16", "KIND_GPU")


def test_fp16_from_params_on_cpu(open_clip_tiny):
    params = make_params("text_encoder", model_name=TINY, allow_random_init="true", precision="fp16")
    with pytest.raises(ConfigError) as info:
        ClipSpec.from_params(params, ModelContext("text_encoder", None))
    assert_names(info.value, "text_encoder", "fp16")


def test_bf16_is_close_to_fp32(spec, image_encoder, text_encoder, tokens):
    bf16 = ClipSpec(TINY, allow_random_init=True, seed=SEED, precision="bf16")
    pixels = random_pixels(3, seed=4)
    image = ImageEncoder(bf16)({"PIXELS": pixels}, EMBEDDING)["EMBEDDING"]
    text = TextEncoder(bf16)({"TOKENS": tokens}, EMBEDDING)["EMBEDDING"]
    assert image.dtype == text.dtype == np.float32
    assert_same_embeddings(image, image_encoder({"PIXELS": pixels}, EMBEDDING)["EMBEDDING"], min_cosine=0.99)
    assert_same_embeddings(text, text_encoder({"TOKENS": tokens}, EMBEDDING)["EMBEDDING"], min_cosine=0.99)


# -- engine: openvino ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def openvino_encoder(spec) -> ImageEncoder:
    return ImageEncoder(spec, engine="openvino", threads=1)


@pytest.mark.parametrize("rows", [1, 3, 8])
def test_openvino_engine_equals_open_clip_at_any_batch_size(openvino_encoder, image_encoder, reference, rows):
    """The same tower traced and compiled by OpenVINO: open_clip's embeddings and the torch path's sequence."""
    pixels = random_pixels(rows, seed=rows)
    out = openvino_encoder({"PIXELS": pixels}, BOTH)
    assert_same_embeddings(out["EMBEDDING"], reference_image(reference, pixels))
    torch_path = image_encoder({"PIXELS": pixels}, BOTH)
    assert out["SEQUENCE"].shape == torch_path["SEQUENCE"].shape and out["SEQUENCE"].dtype == np.float32
    assert cosine_rows(out["SEQUENCE"].reshape(rows, -1), torch_path["SEQUENCE"].reshape(rows, -1)).min() >= 0.9999
    np.testing.assert_array_equal(out["SEQUENCE_MASK"], torch_path["SEQUENCE_MASK"])


def test_openvino_engine_invalid_rows_and_sequence_on_request(openvino_encoder, reference):
    pixels = random_pixels(4, seed=7)
    valid = np.array([[True], [False], [True], [True]])
    out = openvino_encoder({"PIXELS": pixels, "VALID": valid}, EMBEDDING)
    assert set(out) == {"EMBEDDING"} and not out["EMBEDDING"][1].any()
    assert_same_embeddings(out["EMBEDDING"][[0, 2, 3]], reference_image(reference, pixels[[0, 2, 3]]))


def test_openvino_engine_in_bf16_is_close_to_fp32(open_clip_tiny, reference):
    bf16 = ImageEncoder(ClipSpec(TINY, allow_random_init=True, seed=SEED, precision="bf16"), engine="openvino")
    pixels = random_pixels(4, seed=9)
    assert_same_embeddings(bf16({"PIXELS": pixels}, EMBEDDING)["EMBEDDING"], reference_image(reference, pixels),
                           min_cosine=0.99)


def test_openvino_engine_from_repository_style_params(open_clip_tiny):
    params = make_params("image_encoder", model_name=TINY, allow_random_init="true", engine="openvino",
                         torch_threads="1")
    encoder = ImageEncoder.from_parameters(ModelContext("image_encoder", None), params)
    params.reject_unknown()
    assert encoder.engine == "openvino" and encoder.visual is None  # OpenVINO holds the weights


@pytest.mark.parametrize("raw, fragments", [
    ({"engine": "tensorrt"}, ("engine", "tensorrt", "openvino")),
])
def test_unknown_engine_is_a_config_error(open_clip_tiny, raw, fragments):
    params = make_params("image_encoder", model_name=TINY, allow_random_init="true", **raw)
    with pytest.raises(ConfigError) as info:
        ImageEncoder.from_parameters(ModelContext("image_encoder", None), params)
    assert_names(info.value, *fragments)


def test_openvino_engine_needs_a_cpu_instance(open_clip_tiny):
    with pytest.raises(ConfigError) as info:
        ImageEncoder(ClipSpec(TINY, allow_random_init=True), device="cuda:0", engine="openvino")
    assert_names(info.value, "openvino", "KIND_CPU")


# -- text engine: openvino -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def openvino_text(spec) -> TextEncoder:
    return TextEncoder(spec, engine="openvino", threads=1)


@pytest.mark.parametrize("rows", [[0], [1, 3], [0, 1, 2, 3], [3, 3, 2, 1, 0, 0, 1, 2]])
def test_openvino_text_equals_open_clip_at_any_length(openvino_text, text_encoder, reference, tokens, rows):
    """One traced graph for every trimmed length (the batches here trim to different lengths) and batch size."""
    batch = tokens[rows]
    out = openvino_text({"TOKENS": batch}, BOTH)
    assert_same_embeddings(out["EMBEDDING"], reference_text(reference, batch))
    torch_path = text_encoder({"TOKENS": batch}, BOTH)
    assert out["SEQUENCE"].shape == torch_path["SEQUENCE"].shape == (len(rows), 77, 64)
    np.testing.assert_allclose(out["SEQUENCE"], torch_path["SEQUENCE"], atol=1e-4)  # padding zeroed in both
    np.testing.assert_array_equal(out["SEQUENCE_MASK"], torch_path["SEQUENCE_MASK"])


def test_openvino_text_untrimmed_and_invalid_rows(spec, reference, tokens):
    untrimmed = TextEncoder(spec, trim=False, engine="openvino", threads=1)  # the full 77 tokens through the graph
    valid = np.array([[True], [False], [True], [True]])
    out = untrimmed({"TOKENS": tokens, "VALID": valid}, EMBEDDING)
    assert set(out) == {"EMBEDDING"} and not out["EMBEDDING"][1].any()
    assert_same_embeddings(out["EMBEDDING"][[0, 2, 3]], reference_text(reference, tokens[[0, 2, 3]]))


def test_openvino_text_in_bf16_is_close_to_fp32(open_clip_tiny, reference, tokens):
    bf16 = TextEncoder(ClipSpec(TINY, allow_random_init=True, seed=SEED, precision="bf16"), engine="openvino")
    assert_same_embeddings(bf16({"TOKENS": tokens}, EMBEDDING)["EMBEDDING"], reference_text(reference, tokens),
                           min_cosine=0.99)


def test_openvino_text_from_repository_style_params(open_clip_tiny):
    params = make_params("text_encoder", model_name=TINY, allow_random_init="true", engine="openvino",
                         torch_threads="1", trim_text_tokens="true")
    encoder = TextEncoder.from_parameters(ModelContext("text_encoder", None), params)
    params.reject_unknown()
    assert encoder.engine == "openvino" and encoder.model is None  # OpenVINO holds the weights
    with pytest.raises(ConfigError) as info:
        TextEncoder(ClipSpec(TINY, allow_random_init=True), device="cuda:0", engine="openvino")
    assert_names(info.value, "openvino", "KIND_CPU")


# -- decode_images: image_preprocess and image_encoder in one handler ------------------------------------------------
def photo(seed: int, size=(96, 72), fmt="JPEG") -> bytes:
    import io

    from PIL import Image

    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(buffer, fmt)
    return buffer.getvalue()


@pytest.mark.parametrize("engine", ["torch", "openvino"])
def test_decoding_encoder_equals_preprocess_then_encode(open_clip_tiny, engine):
    """Same EMBEDDING, VALID and STATUS as the two handlers one after the other; a bad row stays its own."""
    from mmfuse.serving.image_preprocess import ImagePreprocessor
    from tests.unit.conftest import bytes_column

    params = make_params("image_encoder", model_name=TINY, allow_random_init="true", seed="3", engine=engine,
                         torch_threads="1", decode_images="true", decode_threads="2", max_image_bytes="100000")
    fused = ImageEncoder.from_parameters(ModelContext("image_encoder", None), params)
    params.reject_unknown()  # the preprocessing parameters are read, not refused
    assert [s.name for s in fused.inputs] == ["IMAGE"]
    rows = bytes_column([photo(1), b"not an image", b"", photo(2, fmt="PNG"), b"x" * 100001])
    out = fused({"IMAGE": rows}, frozenset({"EMBEDDING", "VALID", "STATUS"}))
    pre = ImagePreprocessor(ClipSpec(TINY), decode_threads=1)
    split = pre({"IMAGE": rows}, frozenset({"PIXELS"}))
    encoder = ImageEncoder(ClipSpec(TINY, allow_random_init=True, seed=3), engine=engine, threads=1)
    expected = encoder({"PIXELS": split["PIXELS"], "VALID": split["VALID"]}, EMBEDDING)["EMBEDDING"]
    assert out["STATUS"].reshape(-1).tolist() == [b"ok", b"undecodable", b"missing", b"ok", b"too_large"]
    np.testing.assert_array_equal(out["VALID"], split["VALID"])
    np.testing.assert_allclose(out["EMBEDDING"], expected, atol=1e-6)
    assert not out["EMBEDDING"][[1, 2, 4]].any() and out["EMBEDDING"][[0, 3]].any()
    assert "SEQUENCE" not in out
    fused.close()
    pre.close()


def test_decoding_encoder_gives_the_sequence_on_request(open_clip_tiny):
    params = make_params("image_encoder", model_name=TINY, allow_random_init="true", decode_images="true")
    fused = ImageEncoder.from_parameters(ModelContext("image_encoder", None), params)
    from tests.unit.conftest import bytes_column

    out = fused({"IMAGE": bytes_column([photo(5), b""])}, BOTH)
    assert out["SEQUENCE"].shape[0] == 2 and out["SEQUENCE_MASK"][0].all() and not out["SEQUENCE_MASK"][1].any()
    fused.close()
