"""Redaction of PII and secrets in every log record of the process.

Installed as a log-record factory, so it covers every logger and handler (ours, uvicorn's, libraries')
whatever was configured before or after. Exceptions are formatted and scrubbed too. On by default;
`privacy.redact_logs: false` turns it off.
"""

from __future__ import annotations

import logging
import traceback

from concilium.guard.pii import redact

_state = {"installed": False, "on": True}
_base_factory = logging.getLogRecordFactory()


def _factory(*args, **kwargs) -> logging.LogRecord:
    record = _base_factory(*args, **kwargs)
    if not _state["on"]:
        return record
    try:
        message = record.getMessage()
    except Exception:  # a bad format string: leave it to the handler to report
        return record
    record.msg, record.args = redact(message), None
    if record.exc_info and record.exc_info[0] is not None and not record.exc_text:
        record.exc_text = redact("".join(traceback.format_exception(*record.exc_info)).rstrip("\n"))
    return record


def redacting() -> bool:
    """Is redaction in effect (installed and on)?"""
    return _state["on"] and _state["installed"]


def configure(on: bool = True) -> None:
    """Install the factory once; later calls switch redaction on or off."""
    _state["on"] = on
    if not _state["installed"]:
        logging.setLogRecordFactory(_factory)
        _state["installed"] = True
