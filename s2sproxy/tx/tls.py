"""TLS contexts: per-domain server certificates chosen by SNI, client contexts, and the
trust store that checks remote certificate chains.

Choices:

1. TLS 1.2 is the floor on every leg (RFC 9325; Prosody and ejabberd do the same).
2. The server asks for a client certificate but never fails the handshake over it: a
   remote without a valid certificate may still authenticate by dialback.  The chain is
   checked after the handshake against our own store (system CAs and/or ``ca_file``),
   without any extended-key-usage purpose, so certificates lacking clientAuth are
   accepted as Prosody does.  The *name* is checked in ``core.identity``.
3. Without SNI, the certificate is the one for the stream's ``to`` (STARTTLS knows it
   before TLS), or the first configured domain (Direct TLS).
"""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Callable

from cryptography import x509
from OpenSSL import SSL, crypto
from twisted.protocols.policies import ProtocolWrapper
from twisted.protocols.tls import BufferingTLSTransport, TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from twisted.internet.interfaces import (IOpenSSLClientConnectionCreator,
                                         IOpenSSLContextFactory)
from s2sproxy.logs import get_logger
from zope.interface import implementer

try:    # pyOpenSSL's cffi binding: BatchingTLS's flushes and renew_buffers read and
    # replace the memory BIOs (another layout: Twisted's TLS layer as it is)
    from OpenSSL._util import ffi as _ffi, lib as _lib
    if not all(hasattr(_lib, f) for f in ("BIO_get_mem_data", "BIO_new", "BIO_s_mem",
                                          "BIO_free", "SSL_set_bio")):
        raise ImportError("pyOpenSSL's binding lacks a BIO function")
except ImportError:     # pragma: no cover
    _ffi = _lib = None

from s2sproxy.config import Domain, Trust
from s2sproxy.core.jid import InvalidJid, dns_name, nameprep_domain
from s2sproxy.tx.sockets import write_now

log = get_logger(__name__)

ALPN_XMPP_SERVER = b"xmpp-server"   # XEP-0368
_TLS_RECORD = 2 ** 14               # the most plaintext per record, Twisted's write unit


def _accept_any(conn: SSL.Connection, cert: crypto.X509, errno: int, depth: int,
                ok: int) -> bool:
    return True


def _base_context(method: int = SSL.TLS_METHOD) -> SSL.Context:
    ctx = SSL.Context(method)
    ctx.set_min_proto_version(SSL.TLS1_2_VERSION)
    ctx.set_options(SSL.OP_NO_COMPRESSION | SSL.OP_CIPHER_SERVER_PREFERENCE
                    | SSL.OP_NO_TICKET)
    ctx.set_mode(SSL.MODE_RELEASE_BUFFERS)
    ctx.set_cipher_list(b"ECDHE+AESGCM:ECDHE+CHACHA20:DHE+AESGCM:!aNULL:!MD5")
    return ctx


def _load_identity(ctx: SSL.Context, cert: Path, key: Path) -> None:
    ctx.use_certificate_chain_file(str(cert).encode())
    ctx.use_privatekey_file(str(key).encode())
    ctx.check_privatekey()


class ServerContexts:
    """One pyOpenSSL context per served domain; ``for_domain(d)`` is the context whose
    SNI callback may switch to another domain's context."""

    def __init__(self, domains: dict[str, Domain], alpn: bool,
                 extra: tuple[Path, Path] | None = None) -> None:
        self._by_name: dict[str, SSL.Context] = {}
        for name, d in domains.items():
            self._by_name[name] = self._make(d.certificate, d.key, alpn)
        self._default_name = next(iter(domains))
        self._extra = self._make(*extra, alpn) if extra else None

    def _make(self, cert: Path, key: Path, alpn: bool) -> SSL.Context:
        ctx = _base_context()
        _load_identity(ctx, cert, key)
        ctx.set_verify(SSL.VERIFY_PEER, _accept_any)
        ctx.set_session_id(b"s2sproxy")
        ctx.set_tlsext_servername_callback(self._on_sni)
        if alpn:
            ctx.set_alpn_select_callback(_select_alpn)
        return ctx

    def _on_sni(self, conn: SSL.Connection) -> None:
        name = conn.get_servername()
        if name:
            # An A-label SNI names the served domain by its canonical (U-label) form.
            try:
                ctx = self._by_name.get(nameprep_domain(name.decode("ascii")))
            except (UnicodeDecodeError, InvalidJid):
                return
            if ctx is not None:
                conn.set_context(ctx)

    def for_domain(self, domain: str | None) -> SSL.Context:
        if domain and domain in self._by_name:
            return self._by_name[domain]
        if self._extra is not None:
            return self._extra
        return self._by_name[self._default_name]


def _select_alpn(conn: SSL.Connection, offered: list[bytes]) -> bytes:
    if ALPN_XMPP_SERVER in offered:
        return ALPN_XMPP_SERVER
    return SSL.NO_OVERLAPPING_PROTOCOLS


@implementer(IOpenSSLContextFactory)
class ContextFactory:
    """What Twisted's ``startTLS`` and ``TLSMemoryBIOFactory`` expect: an object with
    ``getContext()``.  A callable gives the context in force at each connection (a
    listener's factory outlives a reload; ``Proxy.reload``)."""

    def __init__(self, ctx: SSL.Context | Callable[[], SSL.Context]) -> None:
        self._ctx = ctx

    def getContext(self) -> SSL.Context:  # noqa: N802 (Twisted's name)
        ctx = self._ctx
        return ctx if isinstance(ctx, SSL.Context) else ctx()


@implementer(IOpenSSLClientConnectionCreator)
class ClientCreator:
    """IOpenSSLClientConnectionCreator: a shared context, SNI per connection."""

    def __init__(self, ctx: SSL.Context, server_name: str) -> None:
        self._ctx = ctx
        self._name = _sni_name(server_name)

    def clientConnectionForTLS(self, tls_protocol: object) -> SSL.Connection:  # noqa: N802
        conn = SSL.Connection(self._ctx, None)
        conn.set_app_data(tls_protocol)
        if self._name:
            conn.set_tlsext_host_name(self._name)
        conn.set_connect_state()
        return conn


def _sni_name(server_name: str) -> bytes:
    """RFC 6066 section 3: the HostName is the A-label form of the domain (IDNA2008,
    ``core.jid.dns_name``); a name that is no domain (an address) gets no SNI."""
    try:
        return dns_name(server_name).encode("ascii") if server_name else b""
    except InvalidJid:
        return b""


class ClientContexts:
    """Client contexts, one per (identity, ALPN) and made once: the identity is our
    served domain's certificate, presented so that remotes may use SASL EXTERNAL."""

    def __init__(self) -> None:
        self._cache: dict[tuple, SSL.Context] = {}

    def creator(self, server_name: str, alpn: bool = False,
                identity: tuple[Path, Path] | None = None) -> ClientCreator:
        key = (identity, alpn)
        ctx = self._cache.get(key)
        if ctx is None:
            ctx = self._cache[key] = _base_context()
            ctx.set_verify(SSL.VERIFY_PEER, _accept_any)
            if identity:
                _load_identity(ctx, *identity)
            if alpn:
                ctx.set_alpn_protos([ALPN_XMPP_SERVER])
        return ClientCreator(ctx, server_name)


class TrustStore:
    """Checks a peer's chain against system CAs and/or an extra CA file."""

    def __init__(self, trust: Trust) -> None:
        self._store = crypto.X509Store()
        if trust.system_cas:
            paths = ssl.get_default_verify_paths()
            self._store.load_locations(paths.cafile, paths.capath)
        if trust.ca_file:
            self._store.load_locations(str(trust.ca_file))

    def check(self, conn: SSL.Connection | None) -> tuple[bool, x509.Certificate | None]:
        """(chain valid, leaf certificate) for an established connection."""
        if conn is None:
            return False, None
        leaf = conn.get_peer_certificate()
        if leaf is None:
            return False, None
        chain = [c for c in (conn.get_peer_cert_chain() or [])
                 if c.to_cryptography() != leaf.to_cryptography()]
        try:
            crypto.X509StoreContext(self._store, leaf, chain).verify_certificate()
            ok = True
        except crypto.X509StoreContextError as e:
            log.debug("peer certificate chain not trusted: {err}", err=str(e))
            ok = False
        return ok, leaf.to_cryptography()


def tls_connection_of(transport: object) -> SSL.Connection | None:
    """The pyOpenSSL connection under a transport, for STARTTLS'd TCP transports
    (``transport.protocol`` is the TLSMemoryBIOProtocol) and for TLS-wrapped
    protocols (the transport *is* the TLSMemoryBIOProtocol)."""
    for obj in (transport, getattr(transport, "protocol", None)):
        conn = getattr(obj, "_tlsConnection", None)
        if conn is not None:
            return conn
    return None


def peer_hello_read(conn: SSL.Connection | None, accepted: bool) -> bool:
    """Whether the peer's hello was read on an unfinished handshake: its random is
    known from then on (the client's on a connection we ``accepted``, where we are the
    TLS server; the server's on one we opened)."""
    if conn is None:
        return False
    heard = conn.client_random() if accepted else conn.server_random()
    return bool(heard and heard.strip(b"\0"))


def tls_layer(transport: object, proto: object) -> TLSMemoryBIOProtocol | None:
    """The TLSMemoryBIOProtocol that decrypts for ``proto`` directly: ``transport``
    itself (Direct TLS) or, after STARTTLS, the TCP transport's ``protocol``.  None
    when TLS is not there, or wraps something else (a PROXY-protocol wrapper between
    them): then nothing is changed."""
    for obj in (transport, getattr(transport, "protocol", None)):
        if isinstance(obj, TLSMemoryBIOProtocol) and obj.wrappedProtocol is proto:
            return obj
    return None


class BatchingTLS(BufferingTLSTransport):
    """Twisted's TLS layer hands each TLS record of a TCP read to the protocol on its
    own, and holds each write for its next reactor iteration (to merge small
    writes).  A StreamProtocol's TLS layer becomes this (``batch_tls``): the records
    of one TCP read are handled as one read (``StreamProtocol._batch``), so what
    they carry leaves in one write per stream, and that write goes out at once: no
    reactor iteration of added CPU and latency (issue 9: 0.33 -> 0.22 ms added at
    p50 at 10k stanzas/s), and no more TLS records than reads.  A class, not
    per-stream closures: an idle stream holds nothing more for it."""

    def dataReceived(self, data: bytes) -> None:  # noqa: N802 (Twisted's name)
        proto = self.wrappedProtocol
        proto._batch = []
        try:
            super().dataReceived(data)
        except BaseException:
            proto._batch = None
            raise
        batch, proto._batch = proto._batch, None
        if batch:
            proto._receive(batch[0] if len(batch) == 1 else b"".join(batch))
        if proto.renewed_bytes < 0:
            # The handshake's certificates are still in the BIOs: new ones as soon
            # as nothing waits in them (``renew_buffers``), so that the next
            # connections' handshakes reuse that memory.
            proto.renew_buffers()

    def _write_now(self, data: bytes) -> None:
        # Around Twisted's aggregator, which would schedule a reactor call per write
        # (a callLater(0) for a flush that finds nothing left): what it holds from
        # before this layer batched (the handshake's writes) goes first.
        aggregator = self._aggregator
        if getattr(aggregator, "_buffer", None):
            aggregator.flush()
        if len(data) <= _TLS_RECORD:
            TLSMemoryBIOProtocol.write(self, data)
            return
        # Twisted encrypts a long write 16 KiB at a time and flushes after each
        # record: the records are taken out of the BIO one by one as before (a
        # memory BIO keeps the largest size it held) and sent together (one send,
        # as doWrite did).
        self._held = held = []
        try:
            TLSMemoryBIOProtocol.write(self, data)
        finally:
            self._held = None
            if held:
                self._send(b"".join(held))

    _held: list[bytes] | None = None

    def _send(self, data: bytes) -> None:
        if self._aborting:
            self.transport.write(data)
        else:
            write_now(self.transport, data)

    def abortConnection(self) -> None:  # noqa: N802 (Twisted's name)
        # Twisted's abort writes a close_notify, then aborts the TCP connection,
        # which drops what is still in its buffer: that alert must wait there (an
        # abort tells the peer nothing was closed cleanly; ``_send``).
        self._aborting = True
        super().abortConnection()

    _aborting = False

    # Twisted's loops end on an exception: a recv that finds no more records raises
    # WantReadError, and so does reading an empty send BIO, each after allocating a
    # 32 KiB buffer.  These two ask the BIOs what they hold instead (the same
    # exceptions are still handled as Twisted does).

    def _flushSendBIO(self) -> None:  # noqa: N802 (Twisted's name)
        conn = self._tlsConnection
        out = conn._from_ssl
        n = _lib.BIO_get_mem_data(out, _ffi.NULL)
        while n > 0:
            if self._held is not None:
                self._held.append(conn.bio_read(n))
            else:
                self._send(conn.bio_read(n))
            n = _lib.BIO_get_mem_data(out, _ffi.NULL)

    def _flushReceiveBIO(self) -> None:  # noqa: N802 (Twisted's name)
        conn = self._tlsConnection
        while not self._lostTLSConnection:
            try:
                data = conn.recv(32768)
            except SSL.WantReadError:
                break
            except SSL.ZeroReturnError:
                self._shutdownTLS()
                self._tlsShutdownFinished(None)
            except SSL.Error:
                self._tlsShutdownFinished(Failure())
            else:
                if not self._aborted:
                    ProtocolWrapper.dataReceived(self, data)
                # nothing decrypted waits, no record is in the read BIO: a recv
                # now could only raise WantReadError (at the end of the connection,
                # Twisted's recv that finds the EOF is kept: it sets the reason).
                # Sound with OpenSSL's read_ahead off, its default (pyOpenSSL has no
                # setter): it takes exactly one record's bytes from the BIO per read.
                if (not self._lostTLSConnection and not self._tcp_gone
                        and not conn.pending()
                        and not _lib.BIO_get_mem_data(conn._into_ssl, _ffi.NULL)):
                    break
        self._flushSendBIO()

    _tcp_gone = False

    def connectionLost(self, reason: Failure) -> None:  # noqa: N802 (Twisted's name)
        self._tcp_gone = True
        super().connectionLost(reason)


def batch_tls(transport: object, proto: object) -> bool:
    """Make ``proto``'s TLS layer a ``BatchingTLS`` (Twisted's own
    BufferingTLSTransport, from a Direct TLS listener or from STARTTLS); anything else
    is left as it is."""
    tls = tls_layer(transport, proto)
    if tls is None or type(tls) is not BufferingTLSTransport or _lib is None \
            or getattr(tls._tlsConnection, "_from_ssl", None) is None:
        return False
    tls.__class__ = BatchingTLS
    tls.write = tls._write_now      # replaces BufferingTLSTransport's instance attribute
    return True


def renew_buffers(transport: object, proto: object) -> bool:
    """Give ``proto``'s TLS connection new, empty memory BIOs (``policy.keepalive``
    rule 7, an idle stream).  Twisted's TLS layer moves bytes through two OpenSSL
    memory BIOs, and a memory BIO never gives back the largest size it once held: a
    stream that carried one 16 KiB burst holds 24 KiB more for the rest of its life
    (measured with OpenSSL 4.0, idle TLS 1.3 server connections).  Done only when
    nothing waits in either BIO, nor in Twisted's own buffer of writes; the SSL
    object keeps its state and reads and writes through the new BIOs as pyOpenSSL
    set them up (``Connection(ctx, None)``).  True if renewed."""
    tls = tls_layer(transport, proto)
    if (_lib is None or type(tls) is not BatchingTLS or not tls._handshakeDone
            or tls._lostTLSConnection or tls._appSendBuffer):
        return False
    conn = tls._tlsConnection
    ssl_, into, out = (getattr(conn, "_ssl", None), getattr(conn, "_into_ssl", None),
                       getattr(conn, "_from_ssl", None))
    if ssl_ is None or into is None or out is None:
        return False
    if _lib.BIO_get_mem_data(into, _ffi.NULL) or _lib.BIO_get_mem_data(out, _ffi.NULL):
        return False
    new_into = _lib.BIO_new(_lib.BIO_s_mem())
    new_out = _lib.BIO_new(_lib.BIO_s_mem())
    if new_into == _ffi.NULL or new_out == _ffi.NULL:
        for bio in (new_into, new_out):
            if bio != _ffi.NULL:
                _lib.BIO_free(bio)
        return False
    # Both BIOs new: SSL_set_bio frees the old pair and owns the new one.
    _lib.SSL_set_bio(ssl_, new_into, new_out)
    conn._into_ssl, conn._from_ssl = new_into, new_out
    return True
