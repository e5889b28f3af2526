"""structlog JSON logs with the service name, trace id and event id bound; secrets masked."""

from __future__ import annotations

import logging
import sys

import structlog
from opentelemetry import trace

_SECRET_WORDS = ("api_key", "apikey", "authorization", "password", "secret", "token")


def _add_trace_ids(_logger, _name, event_dict: dict) -> dict:
    ctx = trace.get_current_span().get_span_context()
    if ctx.is_valid:
        event_dict.setdefault("trace_id", f"{ctx.trace_id:032x}")
        event_dict.setdefault("span_id", f"{ctx.span_id:016x}")
    return event_dict


def mask_secrets(_logger, _name, event_dict: dict) -> dict:
    for key in list(event_dict):
        lowered = key.lower()
        if any(word in lowered for word in _SECRET_WORDS) and not lowered.endswith(("_tokens", "_per_second")):
            event_dict[key] = "***"
    return event_dict


def _stderr_logger(*_args: object) -> structlog.PrintLogger:
    return structlog.PrintLogger(sys.stderr)


def setup_logging(service: str, level: str = "info") -> None:
    numeric = getattr(logging, level.upper())
    logging.basicConfig(stream=sys.stderr, level=numeric, format="%(message)s", force=True)
    # Libraries log through stdlib; keep their chatter at warning.
    for noisy in ("httpx", "uvicorn.access", "nats", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            _add_trace_ids,
            mask_secrets,
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        # Look sys.stderr up per logger, not once: a replaced stream (tests, redirection)
        # must not leave loggers writing to a closed file.
        logger_factory=_stderr_logger,
        cache_logger_on_first_use=False,
    )
    structlog.contextvars.bind_contextvars(service=service)


def get_logger(name: str | None = None) -> structlog.stdlib.BoundLogger:
    return structlog.get_logger(name)
