"""structlog configuration: console or JSON lines on stderr."""

from __future__ import annotations

import logging
import sys
from typing import Any, Literal

import structlog

LogFormat = Literal["console", "json"]

# Members whose values must never reach a log line.
_SECRET_KEYS = frozenset({"password", "passwords", "key-secret", "secret", "data"})


def configure_logging(fmt: LogFormat = "console", verbose: bool = False) -> None:
    """Send structlog output to stderr; debug (every QMP message) only when verbose."""
    level = logging.DEBUG if verbose else logging.WARNING
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if fmt == "json"
        else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )
    # qemu.qmp logs through the stdlib; keep it quiet, we log every message ourselves.
    logging.getLogger("qemu.qmp").setLevel(logging.CRITICAL)


def redact(value: Any, *, secret_object: bool = False) -> Any:
    """Return ``value`` with secret members masked, for logging QMP arguments."""
    if isinstance(value, dict):
        is_secret = secret_object or value.get("qom-type") == "secret"
        return {
            k: "<redacted>"
            if k in _SECRET_KEYS and (k != "data" or is_secret)
            else redact(v, secret_object=is_secret and k == "props")
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [redact(v) for v in value]
    return value
