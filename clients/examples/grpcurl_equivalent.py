"""What ``grpcurl`` does, with only Triton's public protos, grpcio and grpcio-tools' protoc: no tritonclient.

    mmfuse protoset --out triton.protoset       # grpc_service.proto + model_config.proto as a descriptor set
    python clients/examples/grpcurl_equivalent.py -plaintext -protoset triton.protoset -d @ \\
        127.0.0.1:8001 inference.GRPCInferenceService/ModelInfer < clients/examples/embed_text.request.json

takes the same arguments as the grpcurl command it stands for (``-plaintext``, ``-cacert``/``-cert``/``-key``,
``-protoset``, ``-d`` with ``@`` for stdin) and prints the response as JSON as grpcurl does. It does what a
service in any language does: compile the protos with protoc (here into a temporary folder, for Python), then
call the method with a request built from JSON. Tensors travel as raw little-endian bytes in
``raw_input_contents`` / ``raw_output_contents``; a BYTES element is a 4-byte little-endian length and the bytes.
"""
from __future__ import annotations

import argparse
import importlib
import sys
import tempfile
from pathlib import Path


def compile_protos(protoset: Path, out_dir: Path) -> None:
    from google.protobuf import descriptor_pb2
    from grpc_tools import protoc

    files = [f.name for f in descriptor_pb2.FileDescriptorSet.FromString(protoset.read_bytes()).file]
    code = protoc.main(["protoc", f"--descriptor_set_in={protoset}", f"--python_out={out_dir}",
                        f"--grpc_python_out={out_dir}", *files])
    if code != 0:
        raise SystemExit(f"protoc failed ({code}) on {protoset}")


def channel(args):
    import grpc

    if args.plaintext:
        return grpc.insecure_channel(args.address)
    read = lambda p: Path(p).read_bytes() if p else None  # noqa: E731
    credentials = grpc.ssl_channel_credentials(read(args.cacert), read(args.key), read(args.cert))
    return grpc.secure_channel(args.address, credentials)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="grpcurl_equivalent.py", description=__doc__.splitlines()[0])
    p.add_argument("-plaintext", action="store_true", help="no TLS")
    p.add_argument("-cacert", help="CA certificate (PEM) of the server")
    p.add_argument("-cert", help="client certificate (PEM), mutual TLS")
    p.add_argument("-key", help="client key (PEM), mutual TLS")
    p.add_argument("-protoset", required=True, help="descriptor set of the service's protos")
    p.add_argument("-d", dest="data", default="{}", help="request as JSON; @ reads it from stdin")
    p.add_argument("address", help="HOST:PORT")
    p.add_argument("method", help="package.Service/Method, e.g. inference.GRPCInferenceService/ModelInfer")
    args = p.parse_args(argv)

    from google.protobuf import json_format

    service_name, _, method_name = args.method.rpartition("/")
    data = sys.stdin.read() if args.data == "@" else args.data
    with tempfile.TemporaryDirectory() as tmp:
        compile_protos(Path(args.protoset), Path(tmp))
        sys.path.insert(0, tmp)
        package, _, service = service_name.rpartition(".")
        for path in sorted(Path(tmp).glob("*_pb2.py")):
            module = importlib.import_module(path.stem)
            found = module.DESCRIPTOR.services_by_name.get(service)
            if found is not None and found.full_name == service_name:
                break
        else:
            raise SystemExit(f"service {service_name} is not in {args.protoset}")
        stubs = importlib.import_module(f"{path.stem}_grpc")
        method = found.methods_by_name[method_name]
        request_type = getattr(module, method.input_type.name)
        request = json_format.Parse(data, request_type())
        with channel(args) as ch:
            response = getattr(getattr(stubs, f"{service}Stub")(ch), method_name)(request, timeout=60)
    print(json_format.MessageToJson(response))
    return 0


if __name__ == "__main__":
    sys.exit(main())
