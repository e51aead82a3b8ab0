"""Flag records: one structured log event per flag, a counter per reason and peer
domain, optionally a JSON-lines file of the records and a bounded quarantine file of
the flagged stanzas themselves."""

from __future__ import annotations

import json
import os
import time
from collections import deque
from pathlib import Path

from s2sproxy.core import actions as A
from s2sproxy.core.limits import LAST_FLAGS
from s2sproxy.logs import get_logger
from s2sproxy.metrics import Metrics

log = get_logger("s2sproxy.flags")

MAX_LOGGED_CONTENT = 512     # bytes of a stanza shown at debug level


class FlagRecorder:
    def __init__(self, metrics: Metrics, json_log: Path | None, quarantine: Path | None,
                 quarantine_max_bytes: int) -> None:
        self.metrics = metrics
        self.json_log = json_log
        self.quarantine = quarantine
        self.quarantine_max_bytes = quarantine_max_bytes
        self.count = 0
        self.last: deque[dict] = deque(maxlen=LAST_FLAGS)   # for ``s2sproxy status``

    def record(self, flag: A.Flag, stream_id: str, peer: str, direction: str,
               authenticated: bool = True) -> None:
        """``peer`` is the remote domain concerned; unless ``authenticated`` (it proved
        its identity on a stream), it is logged but never becomes a metric label."""
        self.count += 1
        self.metrics.flags.labels(flag.reason,
                                  self.metrics.peer(peer if authenticated else None),
                                  flag.action).inc()
        record = {"reason": flag.reason, "action": flag.action, "stream": stream_id,
                  "peer": peer, "direction": direction, "kind": flag.kind,
                  "type": flag.type, "id": flag.id, "from": flag.from_, "to": flag.to,
                  "detail": flag.detail}
        self.last.append(dict(record, time=time.time()))
        log.info("flag {reason} action={action} stream={stream} peer={peer} "
                 "direction={direction} kind={kind} type={type} id={id} detail={detail}",
                 **record)
        if flag.raw:
            log.debug("flagged {reason} content: {content}", reason=flag.reason,
                      content=flag.raw[:MAX_LOGGED_CONTENT].decode("utf-8", "replace"))
        if self.json_log is not None:
            self._append(self.json_log, dict(record, time=time.time()), None)
        if self.quarantine is not None and flag.raw:
            self._append(self.quarantine, dict(record, time=time.time(),
                                               content=flag.raw.decode("utf-8", "replace")),
                         self.quarantine_max_bytes)

    @staticmethod
    def _append(path: Path, record: dict, limit: int | None) -> None:
        line = json.dumps(record, ensure_ascii=False) + "\n"
        try:
            if limit is not None and path.exists() \
                    and path.stat().st_size + len(line) > limit:
                # Bounded: keep one previous generation, as logrotate would.
                os.replace(path, path.with_name(path.name + ".1"))
            with open(path, "a", encoding="utf-8") as f:
                f.write(line)
        except OSError as e:
            log.error("cannot write {path}: {err}", path=str(path), err=e.strerror)
