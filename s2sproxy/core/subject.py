"""Whom a flag is about: its direction ("inbound": from a remote server toward
ejabberd), the remote domain concerned, and whether that domain proved itself on a
stream (only then may it become a metric label: an unauthenticated peer chooses the
names it sends, and metric labels must stay bounded)."""

from __future__ import annotations

from typing import Callable

from s2sproxy.core.inbound import InboundStream, Role
from s2sproxy.core.outbound import OutboundState, OutboundStream
from s2sproxy.core.stanza import Stanza

Subject = tuple[str, str, bool]      # (direction, peer domain, authenticated)


def flag_subject(stream: object | None, stanza: Stanza | None, served: frozenset[str],
                 toward_remote: bool, pair_ready: Callable[[tuple[str, str]], bool]
                 ) -> Subject:
    """``stream``: the stream the flag arose on (None for a generated stanza);
    ``toward_remote``: an outgoing stream of ours is to a remote server (not to
    ejabberd); ``pair_ready``: whether a domain pair has a ready link to a remote."""
    if stanza is not None:
        inbound = stanza.to_domain in served
        peer = stanza.from_domain if inbound else stanza.to_domain
        authenticated = inbound or pair_ready((stanza.from_domain, stanza.to_domain))
    elif isinstance(stream, InboundStream):
        inbound = stream.role is Role.PUBLIC
        peer = stream.remote_domain if inbound else stream.local_domain
        authenticated = peer in stream.authenticated_from or not inbound
    elif isinstance(stream, OutboundStream):
        inbound = toward_remote
        peer = stream.config.receiving if inbound else stream.config.originating
        authenticated = stream.state is OutboundState.READY or not inbound
    else:
        inbound, peer, authenticated = False, "", False
    return ("inbound" if inbound else "outbound"), peer, authenticated
