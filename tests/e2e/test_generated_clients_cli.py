"""The command line for services against the real session server: embed, fuse, health, metadata, ensembles,
bench-pipeline; and the grpcurl-equivalent call that uses only Triton's public protos."""
from __future__ import annotations

import base64
import json
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mmfuse.cli import main as mmfuse
from mmfuse.clients.embed_image import EmbedImageClient
from mmfuse.clients.embed_text import EmbedTextClient
from mmfuse.clients.ensembles import CLIENTS
from mmfuse.clients.fuse_image_text import FuseImageTextClient
from tests.conftest import encode

pytestmark = pytest.mark.e2e

REPO_ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = REPO_ROOT / "clients" / "examples"


@pytest.fixture(scope="module")
def image_folder(photos, tmp_path_factory) -> Path:
    """astronaut.jpg + astronaut.txt, broken.jpg (no caption), sub/coffee.png + sub/coffee.txt, notes.md (ignored)."""
    root = tmp_path_factory.mktemp("images")
    (root / "sub").mkdir()
    (root / "astronaut.jpg").write_bytes(encode(photos["astronaut"], "JPEG", quality=90))
    (root / "astronaut.txt").write_text("an astronaut\n")
    (root / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    (root / "sub" / "coffee.png").write_bytes(encode(photos["coffee"], "PNG"))
    (root / "sub" / "coffee.txt").write_text("a cup of coffee")
    (root / "notes.md").write_text("not an image")
    return root


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_embed_an_image_folder_to_npy(server, image_folder, tmp_path, capsys):
    out = tmp_path / "images.npy"
    assert mmfuse(["embed", "image", str(image_folder), "--out", str(out), "--url", server.grpc_url,
                   "--batch", "2"]) == 0
    err = capsys.readouterr().err
    assert "embed_image" in err and "3/3" in err, "a progress bar"
    assert "embedded 3 image rows (2 ok, 1 undecodable)" in err
    index = rows(tmp_path / "images.rows.jsonl")
    files = [image_folder / "astronaut.jpg", image_folder / "broken.jpg", image_folder / "sub" / "coffee.png"]
    assert [r["source"] for r in index] == [str(f) for f in files]
    assert [(r["row"], r["valid"], r["status"]) for r in index] == [(0, True, "ok"), (1, False, "undecodable"),
                                                                   (2, True, "ok")]
    with EmbedImageClient(server.grpc_url) as client:
        expected = client.embed_image([f.read_bytes() for f in files]).embedding
    np.testing.assert_allclose(np.load(out), expected, atol=1e-5)


def test_embed_text_files_and_stdin_to_jsonl(server, tmp_path):
    (tmp_path / "captions.txt").write_text("a cat\n\n  \na dog\n")
    out = tmp_path / "texts.jsonl"
    result = subprocess.run([sys.executable, "-m", "mmfuse.cli", "embed", "text", str(tmp_path / "captions.txt"), "-",
                             "--out", str(out), "--url", server.grpc_url, "--no-progress"],
                            input="from stdin\n", capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    got = rows(out)
    assert [r["source"] for r in got] == [f"{tmp_path / 'captions.txt'}:1", f"{tmp_path / 'captions.txt'}:4",
                                          "<stdin>:1"]
    with EmbedTextClient(server.grpc_url) as client:
        expected = client.embed_text(["a cat", "a dog", "from stdin"]).embedding
    np.testing.assert_allclose(np.array([r["embedding"] for r in got], np.float32), expected, atol=1e-5)


def test_fuse_a_folder_of_pairs_and_a_pairs_file(server, image_folder, tmp_path):
    out = tmp_path / "fused.jsonl"
    assert mmfuse(["fuse", str(image_folder), "--out", str(out), "--url", server.grpc_url, "--no-progress"]) == 0
    got = rows(out)
    assert [(Path(r["image"]).name, r["text"]) for r in got] == [
        ("astronaut.jpg", "an astronaut"), ("broken.jpg", None), ("coffee.png", "a cup of coffee")]
    assert [r["modality_status"] for r in got] == [{"image": "ok", "text": "ok"},
                                                   {"image": "undecodable", "text": "missing"},
                                                   {"image": "ok", "text": "ok"}]
    assert got[1]["modality_mask"] == {"image": False, "text": False} and not any(got[1]["fused"])
    with FuseImageTextClient(server.grpc_url) as client:
        expected = client.fuse_image_text([(image_folder / "astronaut.jpg").read_bytes()], ["an astronaut"]).fused
    np.testing.assert_allclose(got[0]["fused"], expected[0], atol=1e-5)

    pairs = image_folder / "pairs.jsonl"
    pairs.write_text('{"image": "sub/coffee.png", "text": "a cup of coffee"}\n{"image": null, "text": "only text"}\n')
    npy = tmp_path / "pairs.npy"
    assert mmfuse(["fuse", str(pairs), "--out", str(npy), "--url", server.grpc_url, "--no-progress"]) == 0
    index = rows(tmp_path / "pairs.rows.jsonl")
    assert [r["modality_mask"] for r in index] == [{"image": True, "text": True}, {"image": False, "text": True}]
    np.testing.assert_allclose(np.load(npy)[0], got[2]["fused"], atol=1e-5)


def test_bad_inputs_are_named_and_exit_2(server, tmp_path, capsys):
    assert mmfuse(["embed", "image", str(tmp_path / "nope"), "--out", str(tmp_path / "x.npy")]) == 2
    assert "nope: no such file or folder" in capsys.readouterr().err
    assert mmfuse(["embed", "text", str(tmp_path), "--out", str(tmp_path / "x.csv")]) == 2
    assert "the suffix says the format" in capsys.readouterr().err
    (tmp_path / "pairs.jsonl").write_text('{"image": "missing.jpg", "text": "x"}\n')
    assert mmfuse(["fuse", str(tmp_path / "pairs.jsonl"), "--out", str(tmp_path / "x.npy")]) == 2
    assert "pairs.jsonl:1: image" in capsys.readouterr().err


def test_health_metadata_and_ensembles(server, capsys):
    assert mmfuse(["health", "--url", server.grpc_url, "--json"]) == 0
    health = json.loads(capsys.readouterr().out)
    assert health["live"] and health["ready"] and health["healthy"]
    assert health["ensembles"] == {name: True for name in CLIENTS}

    assert mmfuse(["metadata", "embed_text", "--config", "--url", server.grpc_url]) == 0
    meta = json.loads(capsys.readouterr().out)
    assert meta["server"]["version"] == "2.51.0"
    assert meta["models"]["embed_text"]["metadata"]["inputs"] == [{"name": "TEXT", "datatype": "BYTES",
                                                                   "shape": ["-1", "1"]}]
    assert meta["models"]["embed_text"]["config"]["platform"] == "ensemble"

    assert mmfuse(["ensembles", "--url", server.grpc_url, "--json"]) == 0
    listed = {row["name"]: row for row in json.loads(capsys.readouterr().out)}
    assert set(listed) == set(CLIENTS), "ensembles only, each with its generated client (else: mmfuse gen-clients)"
    assert listed["embed_image"]["client"] == "clients/embed_image.py"
    assert all(row["client"].startswith("clients/") for row in listed.values()), "no generated client is stale"

    assert mmfuse(["health", "--url", "127.0.0.1:1", "--retries", "0", "--timeout", "5"]) == 1
    assert "live NO" in capsys.readouterr().out


def test_bench_pipeline_measures_both_runs_and_the_ratio(server, capsys):
    assert mmfuse(["bench-pipeline", "--url", server.grpc_url, "--requests", "48", "--in-flight", "8",
                   "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["same_results"] is True
    assert result["ratio"] == pytest.approx(result["sequential_s"] / result["pipelined_s"])
    # No speed is asserted (docs/clients.md has the figures): Triton's statistics over each run say what reached the
    # server. Both runs sent every request; sequential ones never share a batch (the mechanism that makes the
    # pipelined run faster is checked in test_generated_clients.py).
    for run in ("sequential", "pipelined"):
        assert result["server"][run]["embed_text"]["requests"] == 48, (run, result["server"][run])
        assert result["server"][run]["text_encoder"]["requests"] == 48, (run, result["server"][run])
    encoder = result["server"]["sequential"]["text_encoder"]
    assert encoder["executions"] == 48 and encoder["mean_batch_rows"] == 1.0, encoder
    assert mmfuse(["bench-pipeline", "--url", server.grpc_url, "--ensemble", "fuse_image_text", "--requests", "4",
                   "--batch", "2", "--in-flight", "2", "--warmup", "1"]) == 0
    printed = capsys.readouterr().out
    assert "sequential (sync, 1 in flight)" in printed and "ratio pipelined/sequential" in printed


def test_grpcurl_equivalent_calls_an_ensemble_with_only_tritons_public_protos(server, tmp_path):
    """The grpcurl example of docs/clients.md, run by its stand-in with tritonclient, mmfuse and clients unimportable."""
    protoset = tmp_path / "triton.protoset"
    assert mmfuse(["protoset", "--out", str(protoset)]) == 0
    blocked = ("import runpy, sys\n"
               "for name in ('tritonclient', 'mmfuse', 'clients'): sys.modules[name] = None\n"
               f"sys.argv = [{str(EXAMPLES / 'grpcurl_equivalent.py')!r}] + sys.argv[1:]\n"
               "runpy.run_path(sys.argv[0], run_name='__main__')\n")

    def grpcurl(*args: str, stdin: str | None = None) -> dict:
        result = subprocess.run([sys.executable, "-c", blocked, "-plaintext", "-protoset", str(protoset), *args],
                                input=stdin, capture_output=True, text=True, timeout=120, cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)

    assert grpcurl("-d", "{}", server.grpc_url, "inference.GRPCInferenceService/ServerReady") == {"ready": True}
    request = (EXAMPLES / "embed_text.request.json").read_text()
    response = grpcurl("-d", "@", server.grpc_url, "inference.GRPCInferenceService/ModelInfer", stdin=request)
    raw = {o["name"]: base64.b64decode(r) for o, r in zip(response["outputs"], response["rawOutputContents"])}
    embedding = np.frombuffer(raw["EMBEDDING"], "<f4")
    assert raw["VALID"] == b"\x01"
    assert raw["STATUS"] == struct.pack("<I", 2) + b"ok", "BYTES: 4-byte little-endian length, then the bytes"
    assert base64.b64decode(json.loads(request)["raw_input_contents"][0]) == struct.pack("<I", 5) + b"a cat"
    with EmbedTextClient(server.grpc_url) as client:
        expected = client.embed_text(["a cat"]).embedding[0]
    np.testing.assert_allclose(embedding, expected, atol=1e-6)
