"""The bad-input corpus (tests/corpus.py) against every ensemble of the real session server.

Every row case travels between two clean rows, to embed_<modality> and to fuse_image_text: the row gets
its status and a zero, masked embedding (or a unit embedding when it is odd but valid), and the clean rows
around it are answered exactly as without it. Every structurally wrong request gets INVALID_ARG with a
message that names the tensor (two of them, which Triton 2.51 answers but then leaks, go to the throw-away
server of test_faults.py instead: tests/corpus.py, POISONS_TRITON_2_51). Afterwards: the server is ready, every model is ready, no Python model
process died or was replaced, and clean requests give the answers they gave before the corpus.
"""
from __future__ import annotations

import grpc
import numpy as np
import pytest

from mmfuse import processes
from mmfuse.server import is_ready
from tests.corpus import OK, POISONS_TRITON_2_51, all_request_cases, clean_jpeg, clean_png, kinds, row_cases
from tests.e2e.conftest import MAX_IMAGE_BYTES, MAX_TEXT_CHARS, cosine
from tests.e2e.wire import Wire, statuses

pytestmark = pytest.mark.e2e

ROWS = row_cases(MAX_IMAGE_BYTES, MAX_TEXT_CHARS)
# Two requests poison Triton 2.51's ensemble scheduler: tests/e2e/test_faults.py sends them to its own server.
REQUESTS = [c for c in all_request_cases() if c.name not in POISONS_TRITON_2_51]
MODELS = ("embed_image", "embed_text", "fuse_image_text", "image_preprocess", "image_encoder",
          "text_preprocess", "text_encoder", "fusion")
# The clean neighbours of every bad row: [before, <case>, after].
IMAGES = [clean_jpeg(seed=1), clean_png(seed=2), clean_jpeg(seed=3)]
TEXTS = [b"a red square", b"a photo of a cat", b"two dogs on a beach"]


def test_the_corpus_has_at_least_30_kinds_of_bad_input():
    assert len(kinds(MAX_IMAGE_BYTES, MAX_TEXT_CHARS)) >= 30
    names = {c.name for c in ROWS}
    for required in ("truncated-jpeg", "garbage", "png-body-jpeg-magic", "cmyk-jpeg", "grey-16-bit-png",
                     "palette-png-transparency", "animated-gif", "one-by-one-png", "png-header-20000x20000",
                     "png-decompression-bomb-8000x8000", "huge-random-bytes", "empty", "invalid-utf8",
                     "control-characters", "over-limit-by-one", "emoji"):
        assert required in names, required


@pytest.fixture(scope="module")
def wire(server):
    with Wire(server.grpc_url) as wire:
        yield wire


def _clean_answers(wire: Wire) -> dict[str, dict[str, np.ndarray]]:
    return {
        "embed_image": wire.rows("embed_image", {"IMAGE": IMAGES}),
        "embed_text": wire.rows("embed_text", {"TEXT": TEXTS}),
        "fuse_image_text": wire.rows("fuse_image_text", {"IMAGE": IMAGES, "TEXT": TEXTS}),
    }


@pytest.fixture(scope="module")
def before(server, wire):
    """Stub processes and clean answers before the corpus is sent."""
    return {"stubs": processes.stubs(server.process.pid), "answers": _clean_answers(wire)}


def _check_neighbours(out: dict[str, np.ndarray], clean: dict[str, np.ndarray], key: str) -> None:
    for row in (0, 2):
        np.testing.assert_allclose(out[key][row], clean[key][row], atol=1e-5,
                                   err_msg=f"clean row {row} changed next to a bad row")


@pytest.mark.parametrize("case", ROWS, ids=[f"{c.modality}:{c.name}" for c in ROWS])
def test_bad_row_is_masked_with_its_reason_on_every_ensemble(server, wire, before, case):
    ok = case.status == OK
    clean = before["answers"]
    column = list(IMAGES if case.modality == "image" else TEXTS)
    column[1] = case.data
    embed = "embed_image" if case.modality == "image" else "embed_text"

    # embed_image / embed_text
    out = wire.rows(embed, {case.tensor: column})
    assert statuses(out["STATUS"]) == [["ok"], [case.status], ["ok"]]
    assert out["VALID"].reshape(-1).tolist() == [True, ok, True]
    embedding = out["EMBEDDING"][1]
    assert np.isfinite(embedding).all()
    if ok:
        assert np.linalg.norm(embedding) == pytest.approx(1.0, abs=1e-3)
    else:
        assert not embedding.any(), "a masked row must be all zeros"
    _check_neighbours(out, clean[embed], "EMBEDDING")

    # fuse_image_text: the other modality of the row is clean and must be untouched.
    columns = {"IMAGE": list(IMAGES), "TEXT": list(TEXTS)}
    columns[case.tensor] = column
    out = wire.rows("fuse_image_text", columns)
    index = 0 if case.modality == "image" else 1
    expected_status = ["ok", "ok"]
    expected_status[index] = case.status
    expected_mask = [True, True]
    expected_mask[index] = ok
    assert statuses(out["MODALITY_STATUS"])[1] == expected_status
    assert out["MODALITY_MASK"][1].tolist() == expected_mask
    assert statuses(out["MODALITY_STATUS"])[0] == statuses(out["MODALITY_STATUS"])[2] == ["ok", "ok"]
    assert np.isfinite(out["FUSED"]).all()
    _check_neighbours(out, clean["fuse_image_text"], "FUSED")
    if not ok:
        # The row is the other modality alone.
        other = clean["embed_text" if case.modality == "image" else "embed_image"]["EMBEDDING"][1]
        assert cosine(out["FUSED"][1], other) >= 0.999
    assert is_ready(server.config.http_port)


@pytest.mark.parametrize("case", REQUESTS, ids=[c.name for c in REQUESTS])
def test_malformed_request_gets_invalid_arg_naming_the_tensor(server, wire, before, case):
    with pytest.raises(grpc.RpcError) as info:
        wire.infer(case.ensemble, case.tensors, case.outputs, timeout=60)
    error = info.value
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (error.code(), error.details())
    for mention in case.mentions:
        assert mention in error.details(), (mention, error.details())
    assert is_ready(server.config.http_port)


def test_after_the_corpus_nothing_died_and_answers_are_unchanged(server, wire, before):
    assert server.process.poll() is None, "tritonserver exited"
    assert is_ready(server.config.http_port)
    for model in MODELS:
        assert wire.model_ready(model), model
    after = processes.stubs(server.process.pid)
    assert after == before["stubs"], "a Python model process died or was replaced"
    assert not processes.zombies(server.process.pid)
    answers = _clean_answers(wire)
    for ensemble, outputs in before["answers"].items():
        for name, value in outputs.items():
            if value.dtype == object:
                assert value.tolist() == answers[ensemble][name].tolist(), (ensemble, name)
            else:
                np.testing.assert_allclose(answers[ensemble][name], value, atol=1e-5, err_msg=f"{ensemble} {name}")
