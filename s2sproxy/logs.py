"""Loggers for s2sproxy's own events, filtered by ``log.level`` from the config, and
the JSON-lines observer of ``log.format = "json"``.

twistd owns the log observers (``--logfile``, ``--syslog``) in the text format; this
decides which of our events reach them.  In the JSON format ``s2sproxy.tap`` gives
twistd the observer below instead, writing where ``--logfile`` says (``-`` or
``--nodaemon`` without ``--logfile``: standard output, as journald reads it).
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from typing import IO, Any

from twisted.logger import (FilteringLogObserver, ILogObserver, LogLevel,
                            LogLevelFilterPredicate, Logger, formatEvent,
                            globalLogPublisher)
from zope.interface import implementer

_predicate = LogLevelFilterPredicate(defaultLogLevel=LogLevel.info)
_observer = FilteringLogObserver(globalLogPublisher, [_predicate])

LEVELS = {"debug": LogLevel.debug, "info": LogLevel.info, "warn": LogLevel.warn,
          "error": LogLevel.error}
FORMATS = ("text", "json")


def set_level(name: str) -> None:
    _predicate.defaultLogLevel = LEVELS[name]
    _predicate.clearLogLevels()          # re-reads defaultLogLevel


def get_logger(namespace: str) -> Logger:
    return Logger(namespace=namespace, observer=_observer)


def _plain(v: Any) -> Any:
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    return str(v)


def event_record(event: dict) -> dict:
    """One log event as a flat JSON object: ``time`` (UTC, ISO 8601), ``level``,
    ``namespace``, ``message`` (the formatted text), then the event's named fields
    (``peer``, ``condition``, ... as each log line names them; README "Log lines"),
    and ``traceback`` for a failure.  Twisted's own ``log_*`` keys are left out."""
    level = event.get("log_level")
    rec: dict[str, Any] = {
        "time": datetime.fromtimestamp(event.get("log_time", 0), timezone.utc)
        .isoformat(timespec="milliseconds"),
        "level": getattr(level, "name", "info"),
        "namespace": event.get("log_namespace", "-"),
        "message": formatEvent(event),
    }
    for k, v in event.items():
        if not k.startswith("log_") and k not in rec and k not in ("message", "format",
                                                                  "isError", "system",
                                                                  "time"):
            rec[k] = _plain(v)
    failure = event.get("log_failure")
    if failure is not None:
        rec["traceback"] = failure.getTraceback()
    return rec


@implementer(ILogObserver)
class JsonLinesObserver:
    """One JSON object per line (not ``jsonFileLogObserver``'s record-separated
    events with Twisted's internal keys): what journald, Loki and ELK take as it is."""

    def __init__(self, out: IO[str]) -> None:
        self.out = out

    def __call__(self, event: dict) -> None:
        try:
            line = json.dumps(event_record(event), ensure_ascii=False, default=str)
        except Exception:  # noqa: BLE001 (a log line must never fail the caller)
            line = json.dumps({"level": "error", "message": "unloggable event",
                               "namespace": str(event.get("log_namespace"))})
        self.out.write(line + "\n")
        self.out.flush()
