"""mmfuse.features: the fusion inputs of a manifest's rows, computed by the shipped repository's own step handlers
and cached on disk (shards of token sequences, keyed on configs, weights, manifest and rows)."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from mmfuse import features, shapes
from mmfuse.datasets import read_manifest
from mmfuse.repository import copy_repository, merge_image_decoding, set_parameters, set_sequence_routing
from mmfuse.serving.handler import check_config
from mmfuse.serving.params import Params
from mmfuse.wire import bytes_column, column_bytes
from tests.unit.conftest import MODEL_REPOSITORY, context_for, load_model_config

ROWS = 7
NO_IMAGE, NO_TEXT = 2, 5
FUSION_OUTPUTS = frozenset({"FUSED", "MODALITY_MASK", "MODALITY_STATUS"})


def write_manifest(folder: Path, texts: list[str | None], name: str = "data.jsonl") -> Path:
    lines = []
    for i, text in enumerate(texts):
        image = None if i == NO_IMAGE else f"img{i}.png"
        lines.append(json.dumps({"image": image, "text": text, "label": "ab"[i % 2]}))
    path = folder / name
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("features_data")
    texts = []
    for i, example in enumerate(shapes.generate(ROWS, seed=3)):
        (folder / f"img{i}.png").write_bytes(shapes.png_bytes(example.image))
        # captions of different lengths: the text encoder trims each batch to its longest
        texts.append(None if i == NO_TEXT else example.caption + " and more words" * (i % 3))
    return folder, read_manifest(write_manifest(folder, texts), "classify")


@pytest.fixture(scope="module")
def cache(data, tmp_path_factory):
    _, manifest = data
    return features.extract(MODEL_REPOSITORY, manifest, cache_dir=tmp_path_factory.mktemp("cache"), batch_size=3,
                            progress=False)


def build(name: str):
    """A shipped model's handler, built as the Triton adapter builds it (the version Triton serves)."""
    config = load_model_config(name)
    context = context_for(name)
    handler_class, parsed = check_config(context, Params.from_model_config(name, config),
                                         [t["name"] for t in config.get("input", [])],
                                         [t["name"] for t in config.get("output", [])])
    return handler_class.build(context, parsed)


@pytest.fixture(scope="module")
def handlers():
    built = {name: build(name) for name in ("image_preprocess", "image_encoder", "text_preprocess", "text_encoder",
                                            "fusion")}
    yield built
    for handler in built.values():
        handler.close()


def direct(handlers, examples) -> dict[str, np.ndarray]:
    """The fusion inputs of ``examples`` computed by the step handlers of fuse_image_text, in one batch."""
    images = bytes_column([e.image.read_bytes() if e.image is not None else b"" for e in examples])
    texts = bytes_column([e.text or "" for e in examples])
    sequence = frozenset({"EMBEDDING", "SEQUENCE", "SEQUENCE_MASK"})
    pixels = handlers["image_preprocess"]({"IMAGE": images}, frozenset({"PIXELS", "VALID", "STATUS"}))
    image = handlers["image_encoder"]({"PIXELS": pixels["PIXELS"], "VALID": pixels["VALID"]}, sequence)
    tokens = handlers["text_preprocess"]({"TEXT": texts}, frozenset({"TOKENS", "VALID", "STATUS"}))
    text = handlers["text_encoder"]({"TOKENS": tokens["TOKENS"], "VALID": tokens["VALID"]}, sequence)
    out = {}
    for m, pre, enc in (("IMAGE", pixels, image), ("TEXT", tokens, text)):
        out.update({f"{m}_EMBEDDING": enc["EMBEDDING"], f"{m}_VALID": pre["VALID"], f"{m}_STATUS": pre["STATUS"],
                    f"{m}_SEQUENCE": enc["SEQUENCE"], f"{m}_SEQUENCE_MASK": enc["SEQUENCE_MASK"]})
    return out


def assert_same_inputs(cached: dict[str, np.ndarray], reference: dict[str, np.ndarray]) -> None:
    assert set(cached) == set(reference)
    for name, want in reference.items():
        got = cached[name]
        if name.endswith("_STATUS"):
            assert column_bytes(got) == column_bytes(want), name
        elif name.endswith(("_SEQUENCE", "_SEQUENCE_MASK")):
            # the cache keeps the positions up to the longest real row; the rest is padding (zero, masked)
            length = got.shape[1]
            assert length <= want.shape[1], name
            assert not np.asarray(want)[:, length:].any(), name
            np.testing.assert_allclose(got, want[:, :length], rtol=1e-5, atol=1e-5, err_msg=name)
        else:
            assert got.dtype == want.dtype and got.shape == want.shape, name
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, err_msg=name)


def assert_same_batches(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    """Two extractions of the same rows: equal up to float rounding (the encoders are not bitwise reproducible
    from one run to the next: ~1e-7 differences were measured between two runs in one process)."""
    assert set(got) == set(want)
    for name in want:
        assert got[name].shape == want[name].shape and got[name].dtype == want[name].dtype, name
        if want[name].dtype == object:
            assert column_bytes(got[name]) == column_bytes(want[name]), name
        else:
            np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-6, err_msg=name)


# -- (1) what is cached is what the step handlers give ---------------------------------------------------------------
def test_cached_inputs_equal_the_step_handlers(cache, data, handlers):
    _, manifest = data
    assert not cache.hit and cache.rows == ROWS and cache.seconds > 0
    assert cache.modalities == ("IMAGE", "TEXT") and cache.has_sequences()
    assert_same_inputs(cache.batch(np.arange(ROWS)), direct(handlers, manifest.examples))
    # the pooled image embedding is image_encoder's EMBEDDING of image_preprocess's PIXELS of those bytes
    images = bytes_column([manifest.examples[i].image.read_bytes() for i in (0, 1)])
    pixels = handlers["image_preprocess"]({"IMAGE": images}, frozenset({"PIXELS", "VALID", "STATUS"}))
    embedding = handlers["image_encoder"](pixels, frozenset({"EMBEDDING"}))["EMBEDDING"]
    pooled, present = cache.pooled()
    assert pooled.shape == (ROWS, 2, embedding.shape[1]) and pooled.dtype == np.float32
    np.testing.assert_allclose(pooled[:2, 0], embedding, rtol=1e-5, atol=1e-6)
    meta = json.loads((cache.path / "meta.json").read_text())
    assert meta["rows"] == ROWS and meta["rows_per_s"] > 0 and meta["modalities"] == ["IMAGE", "TEXT"]
    # text sequences are stored trimmed to the longest caption, not the 77-token context
    assert meta["fields"]["TEXT_SEQUENCE"]["max_length"] < 77


# -- (2) the served fusion model gives the same answer on cached and on direct inputs -------------------------------
def test_fusion_on_cached_batch_equals_direct(cache, data, handlers):
    _, manifest = data
    fusion = handlers["fusion"]
    for idx in ([0, 1, 2, 3, 4, 5, 6], [4, NO_TEXT, 1], [NO_IMAGE], [NO_TEXT]):
        want = fusion(direct(handlers, [manifest.examples[i] for i in idx]), FUSION_OUTPUTS)
        got = fusion(cache.batch(idx), FUSION_OUTPUTS)
        np.testing.assert_allclose(got["FUSED"], want["FUSED"], rtol=1e-4, atol=1e-5)
        np.testing.assert_array_equal(got["MODALITY_MASK"], want["MODALITY_MASK"])
        np.testing.assert_array_equal(got["MODALITY_STATUS"], want["MODALITY_STATUS"])


# -- (3) hits and misses -----------------------------------------------------------------------------------------------
def test_second_call_is_a_hit_without_building(cache, data, monkeypatch):
    _, manifest = data

    def refuse(step):
        raise AssertionError(f"built {step.name} on a cache hit")

    monkeypatch.setattr(features, "_build_handler", refuse)
    again = features.extract(MODEL_REPOSITORY, manifest, cache_dir=cache.path.parent, progress=False)
    assert again.hit and again.key == cache.key and again.path == cache.path and again.seconds == 0
    assert again.meta["seconds"] > 0  # the original extraction time is kept
    for name, array in again.batch([6, 0]).items():
        np.testing.assert_array_equal(array, cache.batch([6, 0])[name], err_msg=name)


def test_changed_manifest_text_is_a_miss(cache, data):
    folder, manifest = data
    texts = [e.text for e in manifest.examples]
    texts[0] = "a different caption"
    changed = read_manifest(write_manifest(folder, texts, "changed.jsonl"), "classify")
    other = features.extract(MODEL_REPOSITORY, changed, cache_dir=cache.path.parent, progress=False)
    assert not other.hit and other.key != cache.key
    pooled, _ = other.pooled()
    before, _ = cache.pooled()
    np.testing.assert_allclose(pooled[1:], before[1:], rtol=1e-5, atol=1e-6)  # the other rows are unchanged
    assert not np.allclose(pooled[0, 1], before[0, 1])


def test_keys_follow_images_configs_and_sequences(data, tmp_path):
    folder, manifest = data
    key = features.cache_key(MODEL_REPOSITORY, manifest)
    # the same bytes elsewhere (data folder and repository copied) are the same features
    copy = Path(shutil.copytree(folder, tmp_path / "data"))
    moved = read_manifest(copy / manifest.path.name, "classify")
    repository = copy_repository(MODEL_REPOSITORY, tmp_path / "repo")
    assert features.cache_key(repository, moved) == key
    # an image file's bytes
    (copy / "img1.png").write_bytes(shapes.png_bytes(shapes.generate(1, seed=99)[0].image))
    assert features.cache_key(repository, moved) != key
    # a step's config
    assert features.cache_key(repository, manifest) == key
    set_parameters(repository, "text_preprocess", {"max_text_chars": "4000"})
    assert features.cache_key(repository, manifest) != key
    # the fusion model's own settings (a trained head) do not change what the encoders give
    fresh = copy_repository(MODEL_REPOSITORY, tmp_path / "repo2")
    set_parameters(fresh, "fusion", {"seed": "7"})
    assert features.cache_key(fresh, manifest) == key
    # nor does exporting a classify head (the ensembles' outputs and sequence routing change), nor a new mtime
    from mmfuse.export import set_fusion_head

    set_fusion_head(fresh, "fusion", "attention", ".", True, "classify", ("a", "b"))
    set_sequence_routing(fresh, "fuse_image_text", "fusion", False)
    weights = next((fresh / "image_encoder").glob("*.safetensors"))
    os.utime(weights, ns=(1, 1))
    assert features.cache_key(fresh, manifest) == key
    # but the weights' bytes do, wherever in the file they change
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    assert features.cache_key(fresh, manifest) != key
    assert features.cache_key(MODEL_REPOSITORY, manifest, sequences=False) != key


# -- (4) shards ----------------------------------------------------------------------------------------------------------
def test_sequences_across_small_shards(cache, data, tmp_path, monkeypatch):
    _, manifest = data
    monkeypatch.setattr(features, "SHARD_ROWS", 2)
    sharded = features.extract(MODEL_REPOSITORY, manifest, cache_dir=tmp_path, batch_size=3, progress=False)
    assert sharded.key == cache.key and sharded.shard_rows == 2  # the layout is not part of the key
    files = sorted(p.name for p in sharded.path.glob("TEXT_SEQUENCE.0*.npy"))
    assert files == [f"TEXT_SEQUENCE.{i:05d}.npy" for i in range(4)]
    # each shard is padded to its own longest row, with zeros and mask False
    lengths = np.load(sharded.path / "TEXT_SEQUENCE_MASK.lengths.npy")
    for i, name in enumerate(files):
        seq = np.load(sharded.path / name)
        mask = np.load(sharded.path / name.replace("TEXT_SEQUENCE", "TEXT_SEQUENCE_MASK"))
        rows = lengths[2 * i: 2 * i + 2]
        assert seq.shape[:2] == mask.shape == (len(rows), rows.max())
        for row, length in enumerate(rows):
            assert mask[row, :length].all() and not mask[row, length:].any()
            assert not seq[row, length:].any()
    assert len({np.load(sharded.path / f).shape[1] for f in files}) > 1
    for idx in (np.arange(ROWS), [6, 0, 3], [5, 4], [1]):
        assert_same_batches(sharded.batch(idx), cache.batch(idx))
    # padded to the longest selected row: one short caption alone is not padded to the longest of all
    short = int(np.argmin(np.where(lengths > 0, lengths, 999)))
    assert sharded.batch([short])["TEXT_SEQUENCE"].shape[1] == lengths[short] < lengths.max()


# -- (5) missing modalities ----------------------------------------------------------------------------------------------
def test_missing_rows(cache):
    batch = cache.batch([NO_IMAGE, NO_TEXT, 0])
    assert batch["IMAGE_VALID"].shape == (3, 1) and batch["IMAGE_VALID"][:, 0].tolist() == [False, True, True]
    assert batch["TEXT_VALID"][:, 0].tolist() == [True, False, True]
    assert column_bytes(batch["IMAGE_STATUS"]) == [b"missing", b"ok", b"ok"]
    assert column_bytes(batch["TEXT_STATUS"]) == [b"ok", b"missing", b"ok"]
    assert not batch["IMAGE_SEQUENCE_MASK"][0].any() and batch["IMAGE_SEQUENCE_MASK"][1].all()
    # a missing image keeps the image sequence length (fixed: the patches), all masked
    alone = cache.batch([NO_IMAGE])
    assert alone["IMAGE_SEQUENCE"].shape[1:] == batch["IMAGE_SEQUENCE"].shape[1:]
    assert not alone["IMAGE_SEQUENCE_MASK"].any() and not alone["IMAGE_SEQUENCE"].any()
    statuses = cache.statuses()
    assert statuses[NO_IMAGE] == ["missing", "ok"] and statuses[NO_TEXT] == ["ok", "missing"]
    _, present = cache.pooled()
    assert present.sum() == 2 * ROWS - 2 and not present[NO_IMAGE, 0] and not present[NO_TEXT, 1]


# -- (6) a corrupt cache is rebuilt ----------------------------------------------------------------------------------
def test_corrupt_cache_is_rebuilt(cache, data, tmp_path):
    _, manifest = data
    folder = Path(shutil.copytree(cache.path, tmp_path / cache.key))
    assert features._open(folder, cache.key) is not None
    shard = folder / "IMAGE_SEQUENCE.00000.npy"
    shard.write_bytes(shard.read_bytes()[:1000])  # truncated
    assert features._open(folder, cache.key) is None
    rebuilt = features.extract(MODEL_REPOSITORY, manifest, cache_dir=tmp_path, batch_size=3, progress=False)
    assert not rebuilt.hit and rebuilt.path == folder
    assert_same_batches(rebuilt.batch(np.arange(ROWS)), cache.batch(np.arange(ROWS)))
    assert not list(tmp_path.glob(".*tmp*"))  # no temporary folder left behind
    (folder / "meta.json").unlink()  # a partial folder (no meta.json) is not read either
    assert features._open(folder, cache.key) is None


# -- generic over the steps ------------------------------------------------------------------------------------------
def test_merged_image_decoding_gives_the_same_features(cache, data, tmp_path):
    _, manifest = data
    repository = copy_repository(MODEL_REPOSITORY, tmp_path / "repo")
    assert merge_image_decoding(repository)  # image_preprocess folded into image_encoder: one step less
    merged = features.extract(repository, manifest, cache_dir=tmp_path / "cache", batch_size=3, progress=False)
    assert merged.key != cache.key
    assert_same_batches(merged.batch(np.arange(ROWS)), cache.batch(np.arange(ROWS)))


def test_sequences_requested_where_the_ensemble_does_not_route_them(cache, data, tmp_path):
    _, manifest = data
    repository = copy_repository(MODEL_REPOSITORY, tmp_path / "repo")
    assert set_sequence_routing(repository, "fuse_image_text", "fusion", False)  # a late-fusion style ensemble
    routed_off = features.extract(repository, manifest, cache_dir=tmp_path / "cache", batch_size=3, progress=False)
    assert routed_off.has_sequences()
    assert_same_batches(routed_off.batch(np.arange(ROWS)), cache.batch(np.arange(ROWS)))
    pooled_only = features.extract(MODEL_REPOSITORY, manifest, sequences=False, cache_dir=tmp_path / "cache",
                                   batch_size=3, progress=False)
    assert not pooled_only.has_sequences() and pooled_only.key != cache.key
    want = {k: v for k, v in cache.batch([0, NO_TEXT]).items() if not k.endswith(("_SEQUENCE", "_SEQUENCE_MASK"))}
    assert_same_batches(pooled_only.batch([0, NO_TEXT]), want)
