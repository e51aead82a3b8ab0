"""Transcript helpers: feed a stream bytes in every chunking and compare actions."""

from __future__ import annotations

import datetime
import itertools
from functools import lru_cache

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from s2sproxy.core import actions as A
from s2sproxy.core import xmlstream
from s2sproxy.core import events as E
from s2sproxy.core.dialback import DialbackKeys
from s2sproxy.core.inbound import InboundConfig, InboundStream, Role, TrustPolicy

SECRET = b"unit-test-secret-0123456789"
KEYS = DialbackKeys(SECRET)
LOCAL = "local.example"
REMOTE = "remote.example"

HEADER = (b"<?xml version='1.0'?><stream:stream xmlns='jabber:server' "
          b"xmlns:stream='http://etherx.jabber.org/streams' "
          b"xmlns:db='jabber:server:dialback' to='local.example' from='remote.example' "
          b"version='1.0'>")


def our_header(to: str | None, frm: str | None, sid: str) -> bytes:
    attrs = ""
    if to:
        attrs += f" from='{to}'"
    if frm:
        attrs += f" to='{frm}'"
    return (f"<?xml version='1.0'?><stream:stream xmlns='jabber:server' "
            f"xmlns:stream='http://etherx.jabber.org/streams' "
            f"xmlns:db='jabber:server:dialback'{attrs} id='{sid}' version='1.0' "
            f"xml:lang='en'>").encode()


def merge(actions: list) -> list:
    """Consecutive SendBytes and DeliverStanzas merged, stanzas reduced to raw bytes."""
    out: list = []
    for a in actions:
        if isinstance(a, A.DeliverStanzas):
            a = ("deliver", [s.raw for s in a.stanzas])
            if out and isinstance(out[-1], tuple) and out[-1][0] == "deliver":
                out[-1] = ("deliver", out[-1][1] + a[1])
                continue
        elif isinstance(a, A.SendBytes) and out and isinstance(out[-1], A.SendBytes):
            out[-1] = A.SendBytes(out[-1].data + a.data)
            continue
        out.append(a)
    return out


def ids():
    counter = itertools.count(1)
    return lambda: f"sid{next(counter)}"


def inbound(role: Role = Role.PUBLIC, direct_tls: bool = False,
            trust: TrustPolicy | None = None, max_size: int = 20000,
            max_depth: int = 16) -> InboundStream:
    return InboundStream(InboundConfig(
        role=role, served=frozenset({LOCAL, "other.example"}), keys=KEYS,
        new_stream_id=ids(), max_size=max_size, max_depth=max_depth,
        trust=trust or TrustPolicy(), starttls_available=role is Role.PUBLIC,
        direct_tls=direct_tls))


def feed_chunks(stream, data: bytes, chunks: list[bytes] | None = None,
                events_after: dict[int, object] | None = None) -> list:
    out: list = []
    for c in (chunks if chunks is not None else [data]):
        out += stream.handle(E.DataReceived(c))
    return merge(out)


def every_split(make, data: bytes, prelude=()) -> list:
    """Feed ``data`` whole, byte by byte and split once at every position; assert the
    same merged actions each time and return them."""
    def run(chunks):
        s = make()
        for ev in prelude:
            s.handle(ev)
        out = []
        for c in chunks:
            out += s.handle(E.DataReceived(c))
        return merge(out), s
    whole, stream = run([data])
    assert run([data[i:i + 1] for i in range(len(data))])[0] == whole
    for i in range(1, len(data)):
        assert run([data[:i], data[i:]])[0] == whole, f"split at {i}"
    return whole


@lru_cache(maxsize=None)
def certificate(domain: str, client_auth: bool = True):
    """A CA and a leaf certificate for ``domain`` signed by it."""
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "unit test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(1)
          .not_valid_before(now - datetime.timedelta(days=1))
          .not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    usages = [ExtendedKeyUsageOID.SERVER_AUTH] + ([ExtendedKeyUsageOID.CLIENT_AUTH]
                                                  if client_auth else [])
    leaf = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, domain)]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(2)
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(domain)]), False)
            .add_extension(x509.ExtendedKeyUsage(usages), False)
            .sign(ca_key, hashes.SHA256()))
    return ca, ca_key, leaf, key


#: The framers a test of framer internals runs with: the Python one, and the compiled
#: one when it is built (test_framer_compiled.py fails when it is not, unless
#: S2SPROXY_PURE_PYTHON asks for the Python framer alone).
FRAMERS = [False] + ([True] if xmlstream._framer is not None else [])
