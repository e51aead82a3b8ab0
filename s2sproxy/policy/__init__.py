"""The stanza policy, sans-IO like ``core``: what is normal XMPP, what s2sproxy answers
itself, and what is flagged, with which reason and action."""
