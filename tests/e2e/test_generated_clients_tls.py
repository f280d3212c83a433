"""The generated clients over mutual TLS, sync and asyncio, on a second real server whose repository also has
a new ensemble folder: its client comes from `mmfuse gen-clients` alone (no hand edits) and is called too."""
from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys
import uuid

import numpy as np
import pytest

from mmfuse.clients import ClientOptions, ServerUnavailable, TLSOptions
from mmfuse.clients.ensembles import CLIENTS
from mmfuse.repository import copy_repository
from mmfuse.server import TLSConfig
from mmfuse.tls import make_certificates
from tests.e2e.conftest import start_server
from tests.e2e.test_generated_clients import assert_matches_spec, assert_same, rows_for
from tests.unit.test_codegen import CLIENTS as CLIENTS_DIR
from tests.unit.test_codegen import add_new_ensemble, import_package

pytestmark = [pytest.mark.e2e, pytest.mark.slow]  # starts a tritonserver of its own

NEW = "tokenize-text"


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    return make_certificates(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="module")
def tls_repository(e2e_repository, tmp_path_factory):
    repo = copy_repository(e2e_repository, tmp_path_factory.mktemp("tls") / "model_repository")
    add_new_ensemble(repo)
    return repo


@pytest.fixture(scope="module")
def generated(tls_repository, tmp_path_factory):
    """The clients package regenerated for the TLS server's repository: the index of its ensembles."""
    out = tmp_path_factory.mktemp("generated") / f"clients_{uuid.uuid4().hex[:8]}"
    shutil.copytree(CLIENTS_DIR, out, ignore=shutil.ignore_patterns("__pycache__", "examples"))
    result = subprocess.run([sys.executable, "-m", "mmfuse.cli", "gen-clients", "--model-repository",
                             str(tls_repository), "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "tokenize_text.py" in result.stdout
    return import_package(out)


@pytest.fixture(scope="module")
def tls_server(tls_repository, certs, tmp_path_factory):
    server = start_server(tls_repository, tmp_path_factory.mktemp("tls-logs") / "tritonserver",
                          tls=TLSConfig(certs.server_cert, certs.server_key, certs.ca, mutual=True))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def mutual(certs, tls_server) -> ClientOptions:
    return ClientOptions(url=tls_server.grpc_url, timeout_s=60,
                         tls=TLSOptions(certs.ca, certs.client_key, certs.client_cert))


@pytest.mark.parametrize("name", sorted(CLIENTS) + [NEW])
def test_every_ensemble_over_mutual_tls_sync_and_async(name, generated, mutual, server, images):
    module = generated.MODULES[name]
    request = generated.CLIENTS[name].request_type(**rows_for(module, 3, images))
    with generated.CLIENTS[name](options=mutual) as client:
        sync = client.infer(request, max_batch=2)
    assert_matches_spec(module, sync, 3)

    async def run():
        async with generated.ASYNC_CLIENTS[name](options=mutual) as client:
            return await client.infer(request, max_batch=2)

    assert_same(module, sync, asyncio.run(run()))
    if name in CLIENTS:  # the same weights serve in plaintext on the session server: same answers
        with CLIENTS[name](server.grpc_url, timeout_s=60) as plain:
            assert_same(module, sync, plain.infer(CLIENTS[name].request_type(**rows_for(module, 3, images))))


def test_the_new_ensembles_client_returns_open_clip_tokens(generated, mutual, reference):
    client_type = generated.CLIENTS[NEW]
    assert client_type.__name__ == "TokenizeTextClient"
    with client_type(options=mutual) as client:
        out = client.tokenize_text(["a cat", None, "a photo of a dog"])
    assert out.tokens.dtype == np.int64 and out.valid.dtype == np.bool_
    assert out.valid.reshape(-1).tolist() == [True, False, True]
    expected = reference.tokenizer(["a cat", "a photo of a dog"]).numpy()
    np.testing.assert_array_equal(out.tokens[[0, 2], :expected.shape[1]], expected)


def test_without_a_client_certificate_or_without_tls_the_server_refuses(certs, tls_server):
    server_auth_only = ClientOptions(url=tls_server.grpc_url, timeout_s=10, retries=0, tls=TLSOptions(certs.ca))
    plaintext = ClientOptions(url=tls_server.grpc_url, timeout_s=10, retries=0)
    for options in (server_auth_only, plaintext):
        with CLIENTS["embed_text"](options=options) as client:
            with pytest.raises(ServerUnavailable, match=f"embed_text at {tls_server.grpc_url} failed"):
                client.embed_text(["a"])


def test_the_command_line_over_mutual_tls(certs, tls_server, tmp_path):
    (tmp_path / "captions.txt").write_text("a cat\na dog\n")
    tls = ["--url", tls_server.grpc_url, "--tls-ca", str(certs.ca), "--tls-cert", str(certs.client_cert),
           "--tls-key", str(certs.client_key)]
    health = subprocess.run([sys.executable, "-m", "mmfuse.cli", "health", *tls], capture_output=True, text=True,
                            timeout=120)
    assert health.returncode == 0, health.stdout + health.stderr
    assert "live yes, ready yes" in health.stdout
    embed = subprocess.run([sys.executable, "-m", "mmfuse.cli", "embed", "text", str(tmp_path / "captions.txt"),
                            "--out", str(tmp_path / "e.npy"), "--no-progress", *tls],
                           capture_output=True, text=True, timeout=120)
    assert embed.returncode == 0, embed.stderr
    assert np.load(tmp_path / "e.npy").shape[0] == 2
    refused = subprocess.run([sys.executable, "-m", "mmfuse.cli", "health", "--url", tls_server.grpc_url,
                              "--timeout", "10"], capture_output=True, text=True, timeout=120)
    assert refused.returncode == 1 and "live NO" in refused.stdout
