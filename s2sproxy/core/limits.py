"""Fixed limits: the bounds that need no configuration, in one place.

Configurable bounds live in ``config.py`` (``limits.*``, ``queue.*``, ``timeouts.*``);
README.md "Limits and defences" lists both kinds with what a peer gets when it hits one.
"""

from __future__ import annotations

#: seconds a connection may take to go away after we closed it (our stream error or
#: ``</stream:stream>`` written, TCP close requested) before it is aborted: a peer that
#: stops reading cannot hold the socket and its unsent bytes.
CLOSE_GRACE = 10.0

#: distinct remote domains that may become values of a metric's ``peer`` label; later
#: ones are counted under ``other`` (only authenticated domains become values at all:
#: anything claimed before authentication is counted under ``-``).
PEER_LABELS_MAX = 1000
