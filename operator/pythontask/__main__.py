"""`python -m pythontask`: run the PythonTask operator."""

from __future__ import annotations

import argparse
import asyncio
import os

import kopf

from . import handlers as _handlers  # noqa: F401  (registers the kopf handlers)
from . import logs
from .leadership import PROCESS_IDENTITY_ENV, process_identity


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="pythontask-operator", description=__doc__)
    parser.add_argument(
        "-n", "--namespace", action="append", default=[], help="watch this namespace (repeatable)"
    )
    parser.add_argument(
        "-A", "--all-namespaces", action="store_true", help="watch every namespace (the default)"
    )
    parser.add_argument(
        "--liveness",
        default=os.environ.get("PYTHONTASK_LIVENESS", ""),
        help="e.g. http://0.0.0.0:8080/healthz",
    )
    parser.add_argument("--log-level", default=os.environ.get("PYTHONTASK_LOG_LEVEL", "INFO"))
    parser.add_argument(
        "--shards",
        type=int,
        default=None,
        help="split tasks among replicas into this many shards, one Lease each (PYTHONTASK_SHARDS; 1)",
    )
    parser.add_argument(
        "--identity",
        default=None,
        help="this process's name in the leases, before a random tail (PYTHONTASK_IDENTITY; the host name)",
    )
    args = parser.parse_args(argv)
    if args.shards is not None:
        if args.shards < 1:
            parser.error(f"--shards must be at least 1, got {args.shards}")
        os.environ["PYTHONTASK_SHARDS"] = str(args.shards)
    # One identity for the whole process: the leases, the logs, the metrics and the User-Agent say it.
    identity = process_identity(args.identity or os.environ.get("PYTHONTASK_IDENTITY", ""))
    os.environ[PROCESS_IDENTITY_ENV] = identity
    logs.configure(args.log_level.upper(), replica=identity)
    asyncio.run(
        kopf.operator(
            standalone=True,
            clusterwide=not args.namespace,
            namespaces=args.namespace,
            liveness_endpoint=args.liveness or None,
        )
    )


if __name__ == "__main__":
    main()
