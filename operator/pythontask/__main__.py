"""`python -m pythontask`: run the PythonTask operator."""

from __future__ import annotations

import argparse
import asyncio
import os

import kopf

from . import handlers as _handlers  # noqa: F401  (registers the kopf handlers)
from . import logs


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
    args = parser.parse_args(argv)
    logs.configure(args.log_level.upper())
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
