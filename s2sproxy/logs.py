"""Loggers for s2sproxy's own events, filtered by ``log.level`` from the config.

twistd owns the log observers (``--logfile``, ``--syslog``); this only decides which
of our events reach them.  Twisted's own events are left as twistd emits them.
"""

from __future__ import annotations

from twisted.logger import (FilteringLogObserver, LogLevel, LogLevelFilterPredicate,
                            Logger, globalLogPublisher)

_predicate = LogLevelFilterPredicate(defaultLogLevel=LogLevel.info)
_observer = FilteringLogObserver(globalLogPublisher, [_predicate])

LEVELS = {"debug": LogLevel.debug, "info": LogLevel.info, "warn": LogLevel.warn,
          "error": LogLevel.error}


def set_level(name: str) -> None:
    _predicate.defaultLogLevel = LEVELS[name]
    _predicate.clearLogLevels()          # re-reads defaultLogLevel


def get_logger(namespace: str) -> Logger:
    return Logger(namespace=namespace, observer=_observer)
