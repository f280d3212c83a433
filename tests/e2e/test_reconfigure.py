"""`mmfuse reconfigure` against a real tritonserver in explicit model-control mode.

Edit a config.pbtxt, run the command, and the running server answers differently, without a restart;
a broken config is refused before it reaches the server; a config the server refuses, or one whose
answers fail the probe, leaves (or puts back) the old one serving.
"""
from __future__ import annotations

import shutil
import subprocess
import sys

import numpy as np
import pytest

from mmfuse.repository import copy_repository, load_config, parameters, save_config, set_parameters
from tests.conftest import encode
from tests.e2e.conftest import cosine, start_server
from tests.paths import SHIPPED_REPOSITORY as DEFAULT_MODEL_REPOSITORY

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(240)]


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    from mmfuse.export import set_fusion_head

    repo = copy_repository(DEFAULT_MODEL_REPOSITORY, tmp_path_factory.mktemp("reconfigure") / "model_repository")
    pristine = copy_repository(DEFAULT_MODEL_REPOSITORY, tmp_path_factory.mktemp("pristine") / "model_repository")
    for copy in (repo, pristine):  # start from plain late fusion (fixed weights, no task head, no SCORE)
        set_fusion_head(copy, "fusion", "late", "", has_head=False)
    # Explicit model control, only the ensemble under test (its composing models load with it): lean.
    server = start_server(repo, tmp_path_factory.mktemp("reconfigure-logs") / "tritonserver",
                          model_control_mode="explicit", load_models=("fuse_image_text",))
    yield server, repo, pristine
    server.stop()


@pytest.fixture
def live_server(live):
    server, repo, pristine = live
    yield server
    # Every test leaves the files as shipped and the server serving them.
    for name in ("fusion", "image_preprocess", "image_encoder", "fuse_image_text"):
        shutil.copy(pristine / name / "config.pbtxt", repo / name / "config.pbtxt")
    assert reconfigure(server).returncode == 0


@pytest.fixture
def repo(live):
    return live[1]


def reconfigure(server, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mmfuse.cli", "reconfigure", "--model-repository", str(server.config.model_repository),
         "--url", server.grpc_url, *args],
        capture_output=True, text=True, timeout=200,
    )


def fuse(server, image: bytes):
    from mmfuse.clients import MMFuseClient

    with MMFuseClient(server.grpc_url, timeout_s=60) as client:
        # row 0: image and text; row 1: the same image alone
        return client.fuse_image_text([image, image], ["a photo of a cat", ""])


def loads(server, model: str) -> int:
    return server.log_path.read_text(errors="replace").count(f'"loading: {model}:1"')


def served_parameters(server, model: str) -> dict[str, str]:
    import tritonclient.grpc as grpcclient

    with grpcclient.InferenceServerClient(server.grpc_url) as client:
        return parameters(client.get_model_config(model).config)


@pytest.fixture(scope="module")
def image(photos) -> bytes:
    return encode(photos["chelsea"])


def test_changing_the_fusion_parameters_changes_the_answers_without_a_restart(live_server, repo, image):
    pid = live_server.process.pid
    before = fuse(live_server, image)
    assert before.mask.tolist() == [[True, True], [True, False]]
    assert cosine(before.fused[0], before.fused[1]) < 0.99  # the text moves row 0 away from the image alone

    set_parameters(repo, "fusion", {"weights": "1,0"})
    out = reconfigure(live_server)
    assert out.returncode == 0, out.stdout + out.stderr
    assert '-    string_value: "0.5,0.5"' in out.stdout and '+    string_value: "1,0"' in out.stdout
    assert "probe 'fuse_image_text': ok; FUSED changed" in out.stdout
    assert "applied: fusion" in out.stdout
    after = fuse(live_server, image)
    assert after.mask.tolist() == [[True, False], [True, False]]  # text now has weight 0
    assert cosine(after.fused[0], before.fused[1]) > 0.9999  # row 0 is the image alone
    assert served_parameters(live_server, "fusion")["weights"] == "1,0"

    set_parameters(repo, "fusion", {"weights": "0.5,0.5", "normalize": "false"})
    assert reconfigure(live_server, "fusion").returncode == 0
    unnormalised = fuse(live_server, image)
    assert np.linalg.norm(unnormalised.fused[0]) < 0.999  # mean of two different unit vectors
    assert cosine(unnormalised.fused[0], before.fused[0]) > 0.9999  # same direction as before

    assert live_server.process.pid == pid and live_server.process.poll() is None  # never restarted


@pytest.mark.parametrize("model, edit, fragments", [
    ("fusion", lambda c: c.parameters["weights"].MergeFrom(_param("1,0,1")), ["model 'fusion'", "'weights'", "3 values"]),
    ("fusion", lambda c: c.parameters["wieghts"].MergeFrom(_param("1,0")), ["model 'fusion'", "wieghts"]),
    ("fuse_image_text", lambda c: _fusion_step(c).input_map.pop("TEXT_EMBEDDING"),
     ["ensemble 'fuse_image_text'", "TEXT_EMBEDDING"]),
])
def test_a_broken_config_is_refused_and_the_old_one_keeps_serving(live_server, repo, image, model, edit, fragments):
    before = fuse(live_server, image)
    loads_before = loads(live_server, model)
    config = load_config(repo, model)
    edit(config)
    save_config(repo, model, config)

    out = reconfigure(live_server)
    assert out.returncode == 2, out.stdout + out.stderr
    assert "nothing was sent to the server" in out.stderr
    for fragment in fragments:
        assert fragment in out.stderr
    assert loads(live_server, model) == loads_before  # it never reached the server
    assert served_parameters(live_server, "fusion")["weights"] == "0.5,0.5"
    np.testing.assert_array_equal(fuse(live_server, image).fused, before.fused)


def _param(value: str):
    from tritonclient.grpc import model_config_pb2

    return model_config_pb2.ModelParameter(string_value=value)


def test_a_config_the_server_refuses_leaves_the_old_one_serving(live_server, repo, image):
    before = fuse(live_server, image)
    config = load_config(repo, "fusion")
    config.backend = "no_such_backend"  # valid offline (the backends are the server's), refused by the server
    save_config(repo, "fusion", config)
    out = reconfigure(live_server)
    assert out.returncode == 1, out.stdout + out.stderr
    assert "the server refused 'fusion'" in out.stderr
    assert "keeps serving the previous configuration" in out.stdout
    np.testing.assert_array_equal(fuse(live_server, image).fused, before.fused)


def test_a_config_whose_answers_fail_the_probe_is_rolled_back(live_server, repo, image):
    before = fuse(live_server, image)
    set_parameters(repo, "image_preprocess", {"max_image_bytes": "10"})  # loads fine, masks every real image
    out = reconfigure(live_server)
    assert out.returncode == 1, out.stdout + out.stderr
    assert "probe of 'fuse_image_text'" in out.stderr and "too_large" in out.stderr
    assert "rolled back: the previous configuration serves again" in out.stdout
    assert served_parameters(live_server, "image_preprocess")["max_image_bytes"] == "16777216"
    after = fuse(live_server, image)
    assert after.status[0] == ["ok", "ok"]
    np.testing.assert_array_equal(after.fused, before.fused)


def test_encoder_precision_and_batching_change_live(live_server, repo, image):
    before = fuse(live_server, image)
    config = load_config(repo, "image_encoder")
    config.parameters["precision"].string_value = "bf16"
    config.dynamic_batching.max_queue_delay_microseconds = 100
    save_config(repo, "image_encoder", config)
    out = reconfigure(live_server, "--dry-run")
    assert out.returncode == 0 and "dry run: nothing sent" in out.stdout
    assert "max_queue_delay_microseconds: 100" in out.stdout and 'string_value: "bf16"' in out.stdout
    assert served_parameters(live_server, "image_encoder")["precision"] == "fp32"

    out = reconfigure(live_server)
    assert out.returncode == 0, out.stdout + out.stderr
    assert served_parameters(live_server, "image_encoder")["precision"] == "bf16"
    after = fuse(live_server, image)
    assert not np.array_equal(after.fused, before.fused)  # bf16 arithmetic
    assert cosine(after.fused[1], before.fused[1]) > 0.99  # ... of the same model


def _fusion_step(ensemble):
    return [s for s in ensemble.ensemble_scheduling.step if s.model_name == "fusion"][0]


def test_a_third_modality_is_loaded_live_without_touching_the_fusion_code(live_server):
    import tritonclient.grpc as grpcclient

    names = ("tabular_encoder", "fusion_image_text_tabular", "fuse_image_text_tabular")
    with grpcclient.InferenceServerClient(live_server.grpc_url) as client:
        assert not client.is_model_ready("fuse_image_text_tabular")
    out = reconfigure(live_server, *names)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "fuse_image_text_tabular (not loaded)" in out.stdout
    assert "probe 'fuse_image_text_tabular': ok" in out.stdout
    with grpcclient.InferenceServerClient(live_server.grpc_url) as client:
        assert all(client.is_model_ready(n) for n in names)
        config = client.get_model_config("fusion_image_text_tabular").config
        assert parameters(config)["modalities"] == "image,text,tabular"


def test_a_server_without_explicit_model_control_is_named_as_the_cause(server, e2e_repository, tmp_path):
    """The session server runs in the default mode ('none'): the command says how to start it."""
    repo = copy_repository(e2e_repository, tmp_path / "model_repository")
    set_parameters(repo, "fusion", {"weights": "1,0"})
    out = subprocess.run(
        [sys.executable, "-m", "mmfuse.cli", "reconfigure", "--model-repository", str(repo), "--url", server.grpc_url,
         "fusion"], capture_output=True, text=True, timeout=200)
    assert out.returncode == 1, out.stdout + out.stderr
    assert "--model-control-mode=explicit" in out.stderr
    assert served_parameters(server, "fusion")["weights"] != "1,0"


def test_switching_the_fusion_strategy_live(live_server, repo, image):
    """late -> early (seeded random weights: no trained head needed) by a config edit; a typo is refused."""
    before = fuse(live_server, image)
    early = {"strategy": "early", "allow_random_init": "true", "seed": "3",
             "strategy_options": '{"embed_dim": 64, "hiden": 32}'}
    set_parameters(repo, "fusion", early)
    out = reconfigure(live_server)
    assert out.returncode == 2 and "hiden" in out.stderr, out.stdout + out.stderr

    set_parameters(repo, "fusion", {"strategy_options": '{"embed_dim": 64, "hidden": 32}'})
    out = reconfigure(live_server)
    assert out.returncode == 0, out.stdout + out.stderr
    assert '+    string_value: "early"' in out.stdout and "FUSED changed" in out.stdout
    assert served_parameters(live_server, "fusion")["strategy"] == "early"
    after = fuse(live_server, image)
    assert cosine(after.fused[0], before.fused[0]) < 0.99  # another function of the same embeddings
    np.testing.assert_allclose(np.linalg.norm(after.fused, axis=1), 1.0, rtol=1e-4)
    assert after.mask.tolist() == before.mask.tolist() and after.status == before.status
