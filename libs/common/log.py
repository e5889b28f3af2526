"""structlog JSON logs with the service name, trace id and event id bound; secrets masked."""

from __future__ import annotations

import logging
import re
import sys

import structlog
from opentelemetry import trace

# A name is secret when one of its words (split at _ and -) is one of these, or it ends in
# one of the compounds: `access_token`, `api_key` and `Authorization` are; `max_tokens_limit`
# and `api_key_file` (a path) are not.
_SECRET_WORDS = frozenset({"apikey", "authorization", "password", "passwd", "secret", "token", "credentials"})
_SECRET_ENDINGS = ("api_key", "api-key", "private_key")


def _add_trace_ids(_logger, _name, event_dict: dict) -> dict:
    ctx = trace.get_current_span().get_span_context()
    if ctx.is_valid:
        event_dict.setdefault("trace_id", f"{ctx.trace_id:032x}")
        event_dict.setdefault("span_id", f"{ctx.span_id:016x}")
    return event_dict


def is_secret_name(key: str) -> bool:
    """The one rule for what is never logged: names that hold keys, passwords or tokens."""
    lowered = key.lower()
    return lowered.endswith(_SECRET_ENDINGS) or not _SECRET_WORDS.isdisjoint(re.split(r"[_\-]", lowered))


def mask_secrets_in(mapping: dict) -> dict:
    """`mapping` with every secret value replaced by *** (an empty one stays empty: "not set")."""
    for key in list(mapping):
        if is_secret_name(key) and mapping[key]:
            mapping[key] = "***"
    return mapping


def mask_secrets(_logger, _name, event_dict: dict) -> dict:
    return mask_secrets_in(event_dict)


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
