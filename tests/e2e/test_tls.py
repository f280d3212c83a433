"""gRPC over TLS on real tritonservers: the embedded server (mmfuse.server.TLSConfig) with mutual TLS, and
a server started with exactly the TLS flags of the compose variant (deploy/docker-compose.tls.yml),
server-authenticated only. A client that trusts the CA (and, with mutual TLS, presents a certificate the
CA signed) is served; a plaintext client, a client that does not trust the server, and a client without a
certificate (mutual TLS) or with one from another CA are refused before any inference.

Both servers load only embed_text (and its two models): TLS is a property of the transport, not of a model.
"""
from __future__ import annotations

from pathlib import Path

import grpc
import numpy as np
import pytest
import yaml

from mmfuse.server import TLSConfig
from mmfuse.tls import make_certificates
from tests.e2e.conftest import start_server
from tests.e2e.wire import Wire
from tests.paths import REPO_ROOT

pytestmark = [pytest.mark.e2e, pytest.mark.slow]  # starts a tritonserver of its own

COMPOSE = REPO_ROOT / "docker-compose.yml"
COMPOSE_TLS = REPO_ROOT / "deploy" / "docker-compose.tls.yml"
TEXTS = [b"a locked door", b"a key"]


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    return make_certificates(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="module")
def other_ca(tmp_path_factory):
    """A second, unrelated CA with its own client certificate."""
    return make_certificates(tmp_path_factory.mktemp("other-certs"))


def read(path: Path) -> bytes:
    return Path(path).read_bytes()


def credentials(ca: Path | None = None, cert: Path | None = None, key: Path | None = None):
    return grpc.ssl_channel_credentials(root_certificates=read(ca) if ca else None,
                                        private_key=read(key) if key else None,
                                        certificate_chain=read(cert) if cert else None)


def embed(url: str, creds=None) -> np.ndarray:
    with Wire(url, creds) as wire:
        return wire.rows("embed_text", {"TEXT": TEXTS}, timeout=30)["EMBEDDING"]


def assert_refused(url: str, creds=None) -> None:
    with pytest.raises(grpc.RpcError) as info:
        embed(url, creds)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE, (info.value.code(), info.value.details())


# -- the compose variant -----------------------------------------------------------------------------------
def compose_tls_flags(certs_dir: Path, mutual: str = "false") -> list[str]:
    """The flags deploy/docker-compose.tls.yml adds to the base command, with /certs and the env var resolved."""
    base = yaml.safe_load(COMPOSE.read_text())["services"]["triton"]["command"]
    tls = yaml.safe_load(COMPOSE_TLS.read_text())["services"]["triton"]["command"]
    assert tls[: len(base)] == base, "the TLS override must be the base command plus TLS flags"
    flags = tls[len(base):]
    return [f.replace("/certs/", f"{certs_dir}/").replace("${MMFUSE_GRPC_MUTUAL_TLS:-false}", mutual) for f in flags]


def test_compose_tls_override_mounts_the_certificates_and_validates():
    override = yaml.safe_load(COMPOSE_TLS.read_text())["services"]["triton"]
    assert "${MMFUSE_CERTS_DIR:-./deploy/certs}:/certs:ro" in override["volumes"]
    flags = compose_tls_flags(Path("/certs"))
    assert {"--grpc-use-ssl=true", "--grpc-server-cert=/certs/server.crt", "--grpc-server-key=/certs/server.key",
            "--grpc-root-cert=/certs/ca.crt", "--grpc-use-ssl-mutual=false"} <= set(flags)
    assert "--http-address=127.0.0.1" in flags, "plaintext HTTP inference must not be reachable from outside"
    # The merged document is a valid Compose file (the schema the manifest tests use).
    merged = yaml.safe_load(COMPOSE.read_text())
    merged["services"]["triton"]["command"] = override["command"]
    merged["services"]["triton"]["volumes"] = merged["services"]["triton"]["volumes"] + override["volumes"]
    from tests.unit.test_manifests import compose_errors

    assert compose_errors(merged) == []


@pytest.fixture(scope="module")
def compose_tls_server(e2e_repository, certs, tmp_path_factory):
    """A real tritonserver with the compose variant's TLS flags (server-authenticated TLS)."""
    certs_dir = certs.ca.parent
    flags = compose_tls_flags(certs_dir)
    server = start_server(e2e_repository, tmp_path_factory.mktemp("tls-compose-logs") / "tritonserver",
                          model_control_mode="explicit", load_models=("embed_text",),
                          extra_args=["--grpc-address=127.0.0.1", "--metrics-address=127.0.0.1"] + flags)
    yield server
    server.stop()


def test_tls_client_that_trusts_the_ca_is_served(compose_tls_server, certs):
    out = embed(compose_tls_server.grpc_url, credentials(certs.ca))
    assert out.shape[0] == 2 and np.isfinite(out).all()


def test_tls_refuses_plaintext_and_untrusting_clients(compose_tls_server):
    assert_refused(compose_tls_server.grpc_url)  # plaintext
    assert_refused(compose_tls_server.grpc_url, credentials())  # TLS, but trusts only the system CAs


def test_tls_the_high_level_client_works(compose_tls_server, certs):
    from mmfuse.clients import MMFuseClient

    with MMFuseClient(compose_tls_server.grpc_url, ssl=True, root_certificates=str(certs.ca)) as client:
        result = client.embed_text([t.decode() for t in TEXTS])
    assert result.valid.all()


# -- the embedded server, mutual TLS ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def mtls_server(e2e_repository, certs, tmp_path_factory):
    server = start_server(e2e_repository, tmp_path_factory.mktemp("mtls-logs") / "tritonserver",
                          model_control_mode="explicit", load_models=("embed_text",),
                          tls=TLSConfig(certs.server_cert, certs.server_key, certs.ca, mutual=True),
                          extra_args=["--grpc-address=127.0.0.1", "--http-address=127.0.0.1",
                                      "--metrics-address=127.0.0.1"])
    yield server
    server.stop()


def test_mutual_tls_client_with_a_certificate_is_served(mtls_server, certs, compose_tls_server):
    out = embed(mtls_server.grpc_url, credentials(certs.ca, certs.client_cert, certs.client_key))
    np.testing.assert_allclose(out, embed(compose_tls_server.grpc_url, credentials(certs.ca)), atol=1e-5)


def test_mutual_tls_refuses_clients_without_a_valid_certificate(mtls_server, certs, other_ca):
    url = mtls_server.grpc_url
    assert_refused(url)  # plaintext
    assert_refused(url, credentials(certs.ca))  # trusts the server, presents no certificate
    assert_refused(url, credentials(certs.ca, other_ca.client_cert, other_ca.client_key))  # signed by another CA
    # A refused handshake costs the server nothing: a good client is still served.
    assert embed(url, credentials(certs.ca, certs.client_cert, certs.client_key)).shape[0] == 2

