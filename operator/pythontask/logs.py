"""structlog JSON logs, one object per line; kopf's and aiohttp's stdlib logs go through the same renderer."""

from __future__ import annotations

import logging
import sys

import structlog


def configure(level: str = "INFO", replica: str = "") -> None:
    """`replica`: this process's lease identity, on every line (several replicas log side by side)."""

    def add_replica(_: object, __: str, event: structlog.types.EventDict) -> structlog.types.EventDict:
        if replica:
            event.setdefault("replica", replica)
        return event

    shared: list[structlog.types.Processor] = [
        structlog.contextvars.merge_contextvars,
        add_replica,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=shared,
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.format_exc_info,
                structlog.processors.JSONRenderer(),
            ],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # kopf logs every event at DEBUG; INFO and up is what an operator's user wants.
    logging.getLogger("kopf").setLevel(max(logging.INFO, root.level))
    # ...and not a line per handled watch event.
    logging.getLogger("kopf.objects").setLevel(max(logging.WARNING, root.level))
    logging.getLogger("aiohttp").setLevel(logging.WARNING)
    # At DEBUG the API client logs whole response bodies: Secrets' data among them. Never.
    logging.getLogger("kubernetes_asyncio").setLevel(max(logging.INFO, root.level))
