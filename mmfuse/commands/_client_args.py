"""Connection options shared by the commands that call a running server (not a sub-command itself)."""
from __future__ import annotations

import argparse
import os

DEFAULT_URL = os.environ.get("MMFUSE_URL", "127.0.0.1:8001")


def add_connection_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("connection")
    g.add_argument("--url", default=DEFAULT_URL, help="gRPC HOST:PORT (default: $MMFUSE_URL or 127.0.0.1:8001)")
    g.add_argument("--timeout", type=float, default=30.0, help="deadline of each call in seconds (default 30)")
    g.add_argument("--retries", type=int, default=3, help="retries on UNAVAILABLE, with back-off (default 3)")
    g.add_argument("--compression", choices=("gzip", "deflate"), help="compress requests")
    g.add_argument("--tls", action="store_true", help="TLS with the system's root certificates")
    g.add_argument("--tls-ca", help="TLS: CA certificate (PEM) that signed the server's certificate")
    g.add_argument("--tls-cert", help="mutual TLS: this client's certificate (PEM)")
    g.add_argument("--tls-key", help="mutual TLS: this client's private key (PEM)")


def client_options(args: argparse.Namespace, **overrides):
    """``ClientOptions`` from the parsed arguments; ValueError names a bad option."""
    from mmfuse.clients import ClientOptions, TLSOptions

    tls = None
    if args.tls or args.tls_ca or args.tls_cert or args.tls_key:
        if bool(args.tls_cert) != bool(args.tls_key):
            raise ValueError("--tls-cert and --tls-key go together")
        tls = TLSOptions(args.tls_ca, args.tls_key, args.tls_cert)
    return ClientOptions(url=args.url, timeout_s=args.timeout, retries=args.retries, compression=args.compression,
                         tls=tls, **overrides)


def options_or_report(args: argparse.Namespace, command: str, **overrides):
    """``client_options``, or None after printing the bad option for ``mmfuse COMMAND`` (exit 2 then)."""
    import sys

    try:
        return client_options(args, **overrides)
    except ValueError as error:
        print(f"mmfuse {command}: {error}", file=sys.stderr)
        return None
