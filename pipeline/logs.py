"""The one logging setup of every entry point: a stderr handler on the project's loggers, never the root logger
(libraries and the host application keep their own configuration)."""

from __future__ import annotations

import logging
import sys

PROJECT_LOGGERS = ("pipeline", "preprocess", "train", "launch")
LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


def setup_logging(level: str | int = "INFO", *, rank: int | None = None) -> None:
    """Log the project's modules at ``level`` to stderr; idempotent. With ``rank`` (training), lines carry
    ``[rankN]`` and ranks above 0 log warnings and errors only."""
    where = "" if rank is None else f" [rank{rank}]"
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"%(asctime)s %(levelname)s{where} %(name)s: %(message)s", "%H:%M:%S"))
    for name in PROJECT_LOGGERS:
        logger = logging.getLogger(name)
        logger.handlers[:] = [handler]
        logger.setLevel(level if not rank else logging.WARNING)
        logger.propagate = False
