"""Stopping without losing what is in flight (SIGTERM, ``systemctl stop``).

The order, so that every stanza s2sproxy has taken is delivered or bounced:

1. The listeners stop: no new connection is accepted (ejabberd and remotes that
   connect now are refused, and bounce to their own users).
2. Both routers bounce what waits for a stream (``remote-server-timeout``, "s2sproxy
   is shutting down") and open nothing more (``Router.shutdown``).
3. Phase 1: the remotes' streams to us, and our bidi streams, are closed cleanly:
   ``</stream:stream>``, then up to ``SHUTDOWN_WAIT`` seconds for the peer's.  No
   router writes to them any more; what the peers send meanwhile is routed on the
   streams of the later phases, still open, or bounced.
4. Phase 2: ejabberd's own outgoing streams (to the backend listener), once each has
   been quiet for ``SHUTDOWN_QUIET`` seconds (at most ``SHUTDOWN_WAIT``): until then
   what ejabberd sends is read and bounced back to its users.  Why they wait:
   ejabberd (``ejabberd_s2s_out``, 23.01 to 25.x) handles the stanzas already routed
   to a connection whose peer closed it by writing them to the closed socket, where
   they are lost, not bounced; with nothing waiting in its queue, nothing is.
5. Every relayed iq still waiting for its answer is answered ``remote-server-timeout``.
6. Phase 3: the streams only we send on (to ejabberd, to remotes without bidi) are
   closed the same way; then anything left is aborted.

What can still be lost: a stanza that arrives on a phase-1 stream after we closed it
and that can be neither delivered nor bounced (its target and its sender were both
reachable only over phase-1 streams); each is logged ("not bouncing ...").  Data a
peer had not sent when its stream closed stays the peer's to retry or bounce.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from twisted.internet import defer, task

from s2sproxy.core.limits import SHUTDOWN_QUIET, SHUTDOWN_WAIT
from s2sproxy.logs import get_logger

if TYPE_CHECKING:
    from s2sproxy.tx.service import Proxy

log = get_logger(__name__)

_POLL = 0.05


async def shut_down(proxy: "Proxy", stop_listeners) -> None:
    reactor = proxy.reactor
    await stop_listeners()
    for router in (proxy.to_backend, proxy.to_remote):
        proxy._run_ops(router, router.shutdown())
    for phase in (1, 2, 3):
        closing = [p for p in list(proxy.streams) if p.stream.shutdown_phase() == phase]
        if phase == 2:
            await _wait_quiet(reactor, closing, SHUTDOWN_QUIET, SHUTDOWN_WAIT)
        now = reactor.seconds()
        if phase == 3:
            waiting = proxy.policy.unanswered()
            if waiting:
                proxy._answer_unanswered(waiting, "s2sproxy is shutting down")
        for p in closing:
            for router in (proxy.to_backend, proxy.to_remote):
                proxy._run_ops(router, router.stream_closed(p, now))
        for p in closing:
            p.close()
        await _wait_gone(reactor, proxy, closing, SHUTDOWN_WAIT)
    left = [p for p in list(proxy.streams) if p.connected]
    if left:
        log.info("aborting {n} stream(s) still open after shutdown", n=len(left))
        for p in left:
            if p.transport is not None:
                p.transport.abortConnection()


async def _wait_quiet(reactor, protos: list, quiet: float, limit: float) -> None:
    """Until none of ``protos`` received anything for ``quiet`` seconds, or ``limit``."""
    deadline = reactor.seconds() + limit
    while reactor.seconds() < deadline and any(
            p.connected and reactor.seconds() - p.last_rx < quiet for p in protos):
        await task.deferLater(reactor, _POLL, lambda: None)


async def _wait_gone(reactor, proxy: "Proxy", protos: list, limit: float) -> None:
    """Until every connection is gone (its last bytes flushed), or ``limit``."""
    deadline = reactor.seconds() + limit
    while any(p.connected for p in protos) and reactor.seconds() < deadline:
        await task.deferLater(reactor, _POLL, lambda: None)
    for p in protos:
        if p.connected and p.transport is not None:
            p.transport.abortConnection()


def stop(proxy: "Proxy", stop_listeners) -> defer.Deferred:
    return defer.ensureDeferred(shut_down(proxy, stop_listeners))
