"""The local control socket that ``s2sproxy status`` asks (``control.socket``).

A Unix socket, mode 0600 (only the proxy's user and root reach it), never one of the
public listeners.  The protocol is one JSON request line (``{"command": "status"}``)
and one JSON answer, then the connection closes; a request longer than
``CONTROL_MAX_LINE`` bytes, or not JSON, gets ``{"error": ...}``.

``snapshot`` is what ``status`` prints: every open stream, the links that are not
ready (connecting, in back-off, draining) with what waits on them, the pending iqs and
the last flags.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from typing import TYPE_CHECKING, Any

from twisted.internet.endpoints import UNIXServerEndpoint
from twisted.internet.protocol import Factory
from twisted.protocols.basic import LineOnlyReceiver

from s2sproxy import __version__
from s2sproxy.core.inbound import InboundStream
from s2sproxy.core.limits import CONTROL_MAX_LINE, STATUS_MAX_IQS
from s2sproxy.core.routing import LinkState
from s2sproxy.logs import get_logger
from s2sproxy.tx.tls import tls_connection_of

if TYPE_CHECKING:
    from s2sproxy.tx.service import Proxy

log = get_logger(__name__)


def _tls_version(proto) -> str:
    conn = tls_connection_of(proto.transport) if proto.transport is not None else None
    if conn is None:
        return ""
    try:
        return conn.get_protocol_version_name()
    except Exception:  # noqa: BLE001 (a connection mid-handshake or gone)
        return ""


def stream_rows(p: "Proxy", now: float) -> list[dict[str, Any]]:
    rows = []
    carried_by: dict[int, list] = {}         # one pass over the links, not one per stream
    for r in (p.to_backend, p.to_remote):
        for pair, link in r.links.items():
            if link.state is LinkState.READY and link.handle is not None:
                carried_by.setdefault(id(link.handle), []).append((pair, len(link.queue)))
    for proto in sorted(p.streams, key=lambda x: x.opened_at):
        st = proto.stream
        if isinstance(st, InboundStream):
            direction = "in"
            pairs = sorted(f"{a} -> {b}" for a, b in st.authenticated)
        else:
            direction = "out"
            cfg = getattr(st, "config", None)
            ready = getattr(getattr(st, "state", None), "value", "") == "ready"
            pairs = [f"{cfg.originating} -> {cfg.receiving}"] if cfg is not None \
                and ready else []
        carried = [pair for pair, _ in carried_by.get(id(proto), ())]
        queued = sum(n for _, n in carried_by.get(id(proto), ()))
        rows.append({
            "direction": direction, "role": proto.label, "peer": proto.peer,
            "stream_id": getattr(st, "stream_id", ""),
            "authenticated": pairs,
            "carries": [f"{a} -> {b}" for a, b in carried],
            "method": getattr(st, "auth_method", "") or "",
            "tls": _tls_version(proto), "bidi": bool(getattr(st, "bidi", False)),
            "age": round(now - proto.opened_at, 1),
            "in_stanzas": proto.rx_stanzas, "in_bytes": proto.rx_bytes,
            "out_stanzas": proto.tx_stanzas, "out_bytes": proto.tx_bytes,
            "queued": queued,
        })
    return rows


def link_rows(p: "Proxy", now: float) -> list[dict[str, Any]]:
    rows = []
    for name, r in (("to-ejabberd", p.to_backend), ("to-remote", p.to_remote)):
        for (a, b), link in r.links.items():
            if link.state is LinkState.READY or (link.state is LinkState.IDLE
                                                 and not link.queue):
                continue
            rows.append({
                "router": name, "pair": f"{a} -> {b}", "state": link.state.value,
                "queued": len(link.queue), "queued_bytes": link.queued_bytes,
                "failures": link.failures, "condition": link.condition,
                "retry_in": round(max(0.0, link.retry_at - now), 1)
                if link.state is LinkState.BACKOFF else None,
            })
    return rows


def snapshot(p: "Proxy") -> dict[str, Any]:
    now = p.reactor.seconds()
    iqs = p.policy.iqs
    return {
        "version": __version__,
        "pid": os.getpid(),
        "config": str(p.config_path or ""),
        "domains": sorted(p.served),
        "streams": stream_rows(p, now),
        "links": link_rows(p, now),
        "pending_iqs": len(iqs),
        "oldest_iqs": [{"from": x.request.from_, "to": x.request.to, "id": x.request.id,
                        "expires_in": round(x.deadline - now, 1)}
                       for x in iqs.oldest(STATUS_MAX_IQS)],
        "flags_total": p.flags.count,
        "last_flags": list(p.flags.last),
        "rtbl": p.filtering.rtbl.rows(now),
    }


class ControlProtocol(LineOnlyReceiver):
    delimiter = b"\n"
    MAX_LENGTH = CONTROL_MAX_LINE

    def lineReceived(self, line: bytes) -> None:  # noqa: N802 (Twisted's name)
        try:
            request = json.loads(line)
            command = request.get("command") if isinstance(request, dict) else None
        except ValueError:
            command = None
        if command == "status":
            try:
                answer = snapshot(self.factory.proxy)
            except Exception:  # noqa: BLE001 (a bug of ours: one traceback, an answer)
                log.failure("control socket: status failed")
                answer = {"error": "internal error (see the proxy's log)"}
        else:
            answer = {"error": "unknown request: send {\"command\": \"status\"}"}
        self.transport.write(json.dumps(answer, default=str).encode() + b"\n")
        self.transport.loseConnection()

    def lineLengthExceeded(self, line: bytes) -> None:  # noqa: N802
        self.transport.write(b'{"error": "request too long"}\n')
        self.transport.loseConnection()


class ControlFactory(Factory):
    protocol = ControlProtocol
    noisy = False

    def __init__(self, proxy: "Proxy") -> None:
        self.proxy = proxy

    def logPrefix(self) -> str:  # noqa: N802
        return "s2sproxy control socket"


def _answers(path: Path) -> bool:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.settimeout(1.0)
        s.connect(str(path))
        return True
    except OSError:
        return False
    finally:
        s.close()


def listen(p: "Proxy", path: Path):
    """Listen on ``path`` (a stale socket file from a previous run is replaced); a
    failure is one error line, and the proxy runs on without its control socket."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.is_socket():
            if _answers(path):
                log.error("control socket {path} is in use by another process; s2sproxy "
                          "status will not answer this one", path=str(path))
                return None
            path.unlink()
    except OSError as e:
        log.error("control socket {path}: {err}; s2sproxy status will not answer",
                  path=str(path), err=e.strerror)
        return None
    old_umask = os.umask(0o177)       # the socket is made 0600, with no window
    try:
        d = UNIXServerEndpoint(p.reactor, str(path), mode=0o600).listen(ControlFactory(p))
    finally:
        os.umask(old_umask)

    def failed(f):
        log.error("control socket {path}: {err}; s2sproxy status will not answer",
                  path=str(path), err=f.getErrorMessage())
    d.addErrback(failed)
    return d
