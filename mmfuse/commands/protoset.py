"""mmfuse protoset --out FILE: Triton's public gRPC protos as a descriptor set, for grpcurl and protoc.

The set holds ``grpc_service.proto`` (package ``inference``, service ``GRPCInferenceService``) and
``model_config.proto`` exactly as the installed tritonclient (2.51) was compiled from them: what
``grpcurl -protoset FILE`` and ``protoc --descriptor_set_in=FILE`` take, so that a service in any
language can generate its own stubs without mmfuse or tritonclient.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

PROTO_FILES = ("model_config.proto", "grpc_service.proto")  # dependencies first


def descriptor_set() -> bytes:
    from google.protobuf import descriptor_pb2
    from tritonclient.grpc import model_config_pb2, service_pb2

    out = descriptor_pb2.FileDescriptorSet()
    for module in (model_config_pb2, service_pb2):
        module.DESCRIPTOR.CopyToProto(out.file.add())
    return out.SerializeToString(deterministic=True)


def register(sub) -> None:
    p = sub.add_parser("protoset", help="write Triton's public gRPC protos (grpc_service.proto, model_config.proto) "
                                        "as a descriptor set for grpcurl -protoset / protoc --descriptor_set_in")
    p.add_argument("--out", required=True, help="file to write, e.g. triton.protoset")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if not out.parent.is_dir():
        print(f"mmfuse protoset: folder {out.parent} does not exist", file=sys.stderr)
        return 2
    out.write_bytes(descriptor_set())
    print(f"wrote {out} ({', '.join(PROTO_FILES)}); e.g. grpcurl -plaintext -protoset {out} 127.0.0.1:8001 list")
    return 0
