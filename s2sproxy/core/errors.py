"""Stream errors (RFC 6120 section 4.9) and who is to blame for them."""

from __future__ import annotations

from s2sproxy.core.serialize import escape as xml_escape

NS_STREAM_ERRORS = "urn:ietf:params:xml:ns:xmpp-streams"

# RFC 6120 section 4.9.3: every defined condition.  Anything else is a bug of ours.
STREAM_CONDITIONS = frozenset({
    "bad-format", "bad-namespace-prefix", "conflict", "connection-timeout", "host-gone",
    "host-unknown", "improper-addressing", "internal-server-error", "invalid-from",
    "invalid-namespace", "invalid-xml", "not-authorized", "not-well-formed",
    "policy-violation", "remote-connection-failed", "reset", "resource-constraint",
    "restricted-xml", "see-other-host", "system-shutdown", "undefined-condition",
    "unsupported-encoding", "unsupported-feature", "unsupported-stanza-type",
    "unsupported-version",
})


class RemoteProtocolError(Exception):
    """The peer broke the protocol: send this stream error, then close."""

    def __init__(self, condition: str, text: str = "") -> None:
        assert condition in STREAM_CONDITIONS, condition
        super().__init__(f"{condition}: {text}" if text else condition)
        self.condition = condition
        self.text = text


def stream_error_bytes(condition: str, text: str = "") -> bytes:
    """``<stream:error>`` followed by the closing stream tag."""
    body = f"<{condition} xmlns='{NS_STREAM_ERRORS}'/>"
    if text:
        body += f"<text xmlns='{NS_STREAM_ERRORS}'>{xml_escape(text)}</text>"
    return f"<stream:error>{body}</stream:error></stream:stream>".encode("utf-8")
