"""Fixed limits: the bounds that need no configuration, in one place.

Configurable bounds live in ``config.py`` (``limits.*``, ``queue.*``, ``timeouts.*``,
``policy.iq_max_pending``); README.md "Limits and defences" lists both kinds with what a
peer gets when it hits one.  The modules that apply these import them from here.
"""

from __future__ import annotations

# -- streams --------------------------------------------------------------------------

#: bytes a stream header may take with the XML declaration (``core.xmlstream``);
#: beyond: ``policy-violation``
MAX_HEADER_SIZE = 8192

#: namespace declarations a stream header may make (``core.xmlstream``); beyond:
#: ``policy-violation``.  Servers declare three or four (the default namespace,
#: ``stream``, ``db``); each declared prefix is looked for in every stanza of the
#: stream (to make stanzas that use it self-contained), so the number is bounded.
MAX_HEADER_NAMESPACES = 16

#: db:result verifications in flight per incoming stream (``core.inbound``); beyond:
#: the XEP-0220 error ``resource-constraint`` for the extra request
MAX_PENDING_DIALBACK = 8

#: dialback verifications (``db:verify`` toward a remote's authoritative server) in
#: flight at once for all incoming streams together; beyond: the XEP-0220 error
#: ``resource-constraint``.  A verification stops when the stream that asked is gone.
MAX_VERIFICATIONS = 256

#: seconds a connection may take to go away after we closed it (our stream error or
#: ``</stream:stream>`` written, TCP close requested) before it is aborted: a peer that
#: stops reading cannot hold the socket and its unsent bytes (``tx.protocol``)
CLOSE_GRACE = 10.0

#: seconds per shutdown phase for the peers' ``</stream:stream>`` (``tx.shutdown``)
SHUTDOWN_WAIT = 5.0
#: seconds of silence on ejabberd's outgoing stream before it is closed at shutdown
#: (what ejabberd routed to it meanwhile is read and bounced, not lost in ejabberd)
SHUTDOWN_QUIET = 0.25

#: seconds a stream may be silent (no byte heard) before its framer drops its expat
#: parser (about 10 KiB; ``XmlStreamParser.release``, ``policy.keepalive`` rule 7); the
#: next read makes a new one.  Short enough that idle streams, most of them, hold none;
#: long enough that a busy stream never pays for a new parser.
PARSER_RELEASE_IDLE = 10.0

#: seconds between two hand-backs of freed memory to the system (glibc
#: ``malloc_trim``, ``tx.memory``; ``policy.keepalive`` rule 7), done only when parsers
#: or TLS buffers were released since the last one.  It costs the reactor about 1 ms
#: per 30 MiB of heap (30 ms at 1 GiB, measured here), hence at most once a minute.
MEMORY_TRIM_INTERVAL = 60.0

#: bytes a TLS stream must have carried (both ways) since its last renewal before its
#: idle TLS memory buffers are renewed again (``policy.keepalive`` rule 7; the first
#: renewal is due after the handshake, whose certificates leave about 6 KiB there).
TLS_RENEW_MIN_BYTES = 8192

#: domain pairs one outgoing stream of ours to a remote may carry, its first pair
#: included, by XEP-0220 sender multiplexing (``core.outbound``, ``core.routing``);
#: beyond: the next pair opens a connection of its own.  Each pair waiting for its
#: answer holds a timer; 64 keeps one stream's dialback state small while a virtual
#: host with many domains still needs few connections per remote.
MAX_MULTIPLEXED_PAIRS = 64

#: seconds during which a remote domain gets no multiplexed pair after one failed on a
#: stream of ours (an error, 'invalid', no answer in time, or the stream closed while
#: the answer was awaited): a remote that refuses multiplexing, or kills the whole
#: stream over it, costs one attempt per hour, not one per pair (``core.routing``)
MULTIPLEX_HOLDOFF = 3600.0

#: JIDs whose domainpart ``core.jid.cached_domain_of`` remembers (process-wide), each
#: at most ``JID_CACHE_MAX_LENGTH`` characters: at most about 1.5 MiB; when full it is
#: emptied and refills.  Stanzas name the same JIDs over and over, and each stanza's
#: ``from`` and ``to`` are cut and canonicalised (RFC 7622) on the hot path.
JID_CACHE_ENTRIES = 4096
JID_CACHE_MAX_LENGTH = 256

# -- outgoing connections (``core.connect``) ------------------------------------------

#: SRV targets looked up, and connections attempted, per remote domain and attempt
MAX_TARGETS = 8
MAX_ATTEMPTS = 8
#: seconds for a TCP connect while another address is still known to try
ADDRESS_CONNECT_TIMEOUT = 3.0
#: CNAMEs followed for one name, and seconds per DNS try (``tx.resolver``;
#: twisted.names' default of 1, 3, 11, 45 s is long)
CNAME_DEPTH = 8
DNS_TIMEOUT = (2, 5)

# -- what the proxy remembers ---------------------------------------------------------

#: distinct remote domains that may become values of a metric's ``peer`` label; later
#: ones are counted under ``other`` (only authenticated domains become values at all:
#: anything claimed before authentication is counted under ``-``)
PEER_LABELS_MAX = 1000

#: seconds between two log lines about connections refused at accept
REFUSED_LOG_INTERVAL = 60.0

#: caps (XEP-0115) readings of presence ``<c/>`` tags remembered, and verified
#: ``node#ver`` disco#info results kept by ``policy.caps_cache``
CAPS_ANNOUNCED_MAX = 10000
CAPS_CACHE_MAX = 1000

#: seconds before a certificate we present expires from which a warning is logged
#: (at start, at each reload, then once a day; ``tx.certificates``)
CERT_EXPIRY_WARNING = 14 * 86400.0

#: flags kept in memory for ``s2sproxy status`` (the newest; ``tx.flags``)
LAST_FLAGS = 20
#: pending iqs listed by ``s2sproxy status`` (the oldest; all are counted)
STATUS_MAX_IQS = 50
#: bytes of a request line on the control socket (``tx.control``)
CONTROL_MAX_LINE = 1024
#: seconds a connection on a ``haproxy:`` listener may take to send its PROXY header
#: before it is dropped (``tx.proxyprotocol``)
PROXY_HEADER_TIMEOUT = 10.0
#: bad lines of one blocklist file reported one by one (then a count; ``[filter]``)
MAX_REPORTED_BAD_LINES = 20
#: remote domains whose rate buckets are kept (the most recently active; ``[ratelimit]``)
RATE_LIMITED_DOMAINS = 10000
#: longest single pause of a rate-limited remote's reading (then it is read and
#: accounted again; below keepalive.timeout, so a paused stream is never "dead")
RATE_LIMIT_MAX_PAUSE = 30.0
#: bytes of one blocklist file (``filter.deny_files``; JabberSPAM's list is ~20 KiB)
MAX_BLOCKLIST_BYTES = 16 * 1024 * 1024
#: ids one real-time block list may hold (``[[filter.rtbl]]``; xmppbl.org's
#: spam_source_domains holds a few hundred); more are skipped, and counted in the log
RTBL_MAX_ENTRIES = 100_000
#: seconds an RTBL request (subscribe, items) may wait for its answer before it is
#: tried again; and the first retry's delay, doubled at each failure in a row up to
#: ``filter.rtbl_refresh`` (``policy.rtbl`` rule 4)
RTBL_IQ_TIMEOUT = 60.0
RTBL_RETRY_BASE = 5.0
