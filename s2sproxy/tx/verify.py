"""Dialback verification: a key another server gave us is checked as
``core.dialback.verification_route`` says, by asking its authoritative server through
``tx.connector`` (or ejabberd itself, for keys ejabberd gave the backend listener)."""

from __future__ import annotations

from typing import Any

from s2sproxy.core import actions as A
from s2sproxy.core import events as E
from s2sproxy.core.dialback import Verification, verification_route
from s2sproxy.core.inbound import InboundStream, Role
from s2sproxy.core.limits import MAX_VERIFICATIONS
from s2sproxy.logs import get_logger

log = get_logger(__name__)


class Verifier:
    def __init__(self, proxy: Any) -> None:
        self.proxy = proxy
        self.in_flight = 0

    async def verify(self, requester: Any, req: A.VerifyDialback) -> None:
        """Answer ``requester``'s stream with a DialbackVerdict on ``req.key``."""
        p = self.proxy
        backend = isinstance(requester.stream, InboundStream) \
            and requester.stream.role is Role.BACKEND
        route = verification_route(
            own_connection=p.connector.is_own_connection(
                requester.peer, (req.originating, req.receiving)), backend=backend,
            peer_host=requester.peer.rsplit(":", 1)[0],
            trusted_addresses=p.settings.backend.trusted_addresses,
            in_flight=self.in_flight, bound=MAX_VERIFICATIONS)
        if route == Verification.REFUSE:
            log.warn("{label} stream {peer} is our own outgoing connection come back "
                     "({originating} -> {receiving}): refused", label=requester.label,
                     peer=requester.peer, originating=req.originating,
                     receiving=req.receiving)
            requester.run(requester.stream.fail(
                "policy-violation", "this connection comes from s2sproxy itself"))
            return
        if route == Verification.TRUSTED:
            verdict = E.DialbackVerdict(req.originating, req.receiving, True)
        elif route == Verification.BUSY:
            verdict = E.DialbackVerdict(req.originating, req.receiving, None,
                                        "resource-constraint")
        else:
            self.in_flight += 1
            try:
                # Stops between attempts once the asking stream is gone.
                verdict = await p.connector.verify(
                    req, backend, wanted=lambda: not getattr(requester, "closing", False))
            finally:
                self.in_flight -= 1
        outcome = {True: "valid", False: "invalid"}.get(verdict.valid, verdict.condition)
        log.info("dialback verification {originating} -> {receiving}: {verdict}",
                 originating=req.originating, receiving=req.receiving, verdict=outcome)
        if route != Verification.TRUSTED:
            p.metrics.dialback_verifications.labels(outcome or "error").inc()
        requester.handle(verdict)
