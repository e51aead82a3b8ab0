"""The federation world (issue 8) with every backend version: Direct TLS both ways with
Prosody, the whole interop matrix at once, and the fallback paths of the resolver.

Each test runs once per backend (the ``backend`` fixture: ejabberd 24.12, then 23.01,
each behind a fresh s2sproxy); the remote servers, Knot and the zone stay up throughout.
"""

from __future__ import annotations

import re

import pytest

import harness
import versions
import world as W
from conversation import converse_all, deliver_one
from matrix import MATRIX, Cell

pytestmark = pytest.mark.integration

REMOTE_SERVERS = {
    # label, the server's two domains (certificate trusted -> EXTERNAL, not -> dialback),
    # whether it offers bidi
    "p12": ("Prosody 0.12.3", "p12.example", "p12db.example", True),
    "p13": ("Prosody 13.0.1", "p13.example", "p13db.example", True),
    "ejr": ("ejabberd 24.12", "ej.example", "ejdb.example", False),
}


def _log(backend) -> str:
    return backend.proxy.log_text()


_TELLING = re.compile(r"\bflag |not completed|Traceback|\[error\]|\[warning\]|#warn\]|#error\]")


def evidence(log: str, names: set[str], world) -> str:
    """For a failure message: the s2sproxy lines that name a failing cell's remote,
    every flag, handshake and error line, and the remote ejabberd's lines about those
    domains (the log's tail alone misses what happened at the start)."""
    def pick(text: str, most: int) -> str:
        lines = [ln for ln in text.splitlines()
                 if _TELLING.search(ln) or any(n in ln for n in names)]
        return "\n".join(ln[:400] for ln in lines[-most:])
    return (f"-- s2sproxy, lines about {sorted(names)}:\n{pick(log, 120)}\n"
            f"-- remote ejabberd:\n{pick(world.ejr.log_text(), 40)}")


def inbound(log: str, remote: str, local: str) -> list[dict]:
    """The public streams authenticated remote -> local, as dicts of their fields."""
    pat = (rf"public stream authenticated: {re.escape(remote)} -> {re.escape(local)} "
           r"method=(\w+) tls=(\w+) bidi=(\w+) direct_tls=(\w+)")
    return [dict(method=m, tls=t, bidi=b, direct_tls=d) for m, t, b, d in re.findall(pat, log)]


def outbound(log: str, local: str, remote: str) -> list[dict]:
    pat = (rf"remote stream ready: {re.escape(local)} -> {re.escape(remote)} "
           r"method=(\w+) tls=(\w+) bidi=(\w+) direct_tls=(\w+) peer_certificate_valid=(\w+)")
    return [dict(method=m, tls=t, bidi=b, direct_tls=d, valid=v)
            for m, t, b, d, v in re.findall(pat, log)]


def test_direct_tls_both_ways_with_prosody(world, backend):
    """s2sproxy reaches Prosody 13 by Direct TLS (its _xmpps-server SRV record comes
    first), and Prosody 0.12 reaches s2sproxy's Direct TLS listener the same way; both
    authenticate with EXTERNAL, so the certificate each chose by SNI was the right one."""
    alice, tom = W.ALPHA.account(backend.tag), W.BY_NAME["p13.example"].account(backend.tag)
    pat = W.BY_NAME["p12.example"].account(backend.tag)
    out = harness.run_async(lambda: _two(alice, tom, pat, world.trust.bundle), 90)
    assert out[0][0] is not None, out
    assert out[1][0] is not None, out
    log = _log(backend)
    assert re.search(r"remote connection to xmpp\.p13\.example \[127\.0\.1\.21\]:5270 "
                     r"\(direct TLS\) for p13\.example", log), log[-4000:]
    assert outbound(log, "alpha.example", "p13.example") == [dict(
        method="external", tls="True", bidi="True", direct_tls="True", valid="True")], \
        log[-4000:]
    assert inbound(log, "p12.example", "alpha.example") == [dict(
        method="external", tls="True", bidi="True", direct_tls="True")], log[-4000:]
    print(f"\n[{backend.version.version}] alpha -> p13 (s2sproxy dials Direct TLS) "
          f"{out[0][0]:.2f}s; p12 -> alpha (Prosody dials Direct TLS) {out[1][0]:.2f}s")


async def _two(alice, tom, pat, ca):
    return [await deliver_one(alice, tom, ca), await deliver_one(pat, alice, ca)]


def test_every_remote_and_auth_method_at_once(world, backend):
    """The interop matrix row of this backend: every remote server, by dialback and by
    SASL EXTERNAL, all conversations at the same time.  Each must deliver every message,
    answer every ping, exchange caps, keep one bidi connection per domain pair where the
    remote offers bidi (two one-way connections with ejabberd), raise no flag, and make
    no ejabberd log "Unexpected info"."""
    cells = []
    for key, (label, ext, db, bidi) in REMOTE_SERVERS.items():
        for auth, served, remote in (("EXTERNAL", W.ALPHA, ext), ("dialback", W.BETA, db)):
            cells.append((key, label, auth, served, W.BY_NAME[remote], bidi))
    pairs = [(s.account(backend.tag), r.account(backend.tag)) for _k, _l, _a, s, r, _b in cells]
    results = harness.run_async(lambda: converse_all(pairs, world.trust.bundle), 240)
    log = _log(backend)
    m = W.metrics(backend.metrics_port)
    failures = []
    failing: set[str] = set()
    for (key, label, auth, served, remote, bidi), seen in zip(cells, results):
        problems = []
        if seen.error:
            problems.append(seen.error)
        if seen.delivered != seen.expected:
            problems.append(f"delivered {seen.delivered}/{seen.expected}")
        missing = [k for k, v in seen.pings.items() if v is None]
        if len(seen.pings) != 4 or missing:
            problems.append(f"pings {seen.pings}")
        if seen.disco != [True, True]:
            problems.append(f"disco {seen.disco}")
        method = "external" if auth == "EXTERNAL" else "dialback"
        ins = inbound(log, remote.name, served.name)
        outs = outbound(log, served.name, remote.name)
        streams = ins + outs
        if any(s["method"] != method for s in streams) or not streams:
            problems.append(f"authentication {streams}, expected {method}")
        if bidi:
            shape = "bidi"
            if len(streams) != 1 or streams[0]["bidi"] != "True":
                problems.append(f"expected one bidi connection, got {streams}")
            rows = [s["dir"] for s in world.remotes[key].s2s_sessions()
                    if s["host"] == remote.name and s["remote"] == served.name]
            if rows != ["<->"]:
                problems.append(f"Prosody's s2s show for {remote.name}: {rows}")
        else:
            # ejabberd 24.12 offers bidi in the wrong namespace and looks for the same in
            # ours: never bidi, never a stream closed over it.
            shape = "2 one-way"
            if len(ins) != 1 or len(outs) != 1 or any(s["bidi"] != "False" for s in streams):
                problems.append(f"expected two one-way connections, got {streams}")
            if f"remote {remote.name} offers bidi in the request's namespace" not in log:
                problems.append("ejabberd's misnamed bidi feature not seen")
            # Its DNS view has no _xmpps-server for us (world.zone: its Direct TLS race),
            # so it comes by STARTTLS.
            if any(s["direct_tls"] != "False" for s in ins):
                problems.append(f"ejabberd came by Direct TLS: {ins}")
        ok = not problems
        summary = (f"{seen.delivered}/{seen.expected} msgs, "
                   f"{sum(v is not None for v in seen.pings.values())}/4 pings, "
                   f"caps, {shape}, {seen.elapsed:.1f} s")
        MATRIX.put(f"ejabberd {backend.version.version}", label, auth, Cell(ok, summary, problems))
        if problems:
            failures.append(f"{label} {auth} ({served.name} <-> {remote.name}): {problems}")
            failing.add(remote.name)
    flags = {k: v for k, v in m.items() if k.startswith("s2sproxy_flags_total")}
    if flags:
        failures.append(f"flags raised: {flags}")
    for name, text in (("backend ejabberd", backend.ejabberd.log_text()),
                       ("remote ejabberd", world.ejr.log_text())):
        if "Unexpected info" in text:
            failures.append(f"{name} logged Unexpected info")
    if "Traceback" in log:
        failures.append("s2sproxy logged a traceback")
    # Every stanza went on a stream authenticated for its own domain pair: no peer ever
    # complained (a stream error toward us), and no Prosody saw one for an unverified
    # pair (it would log it and close with invalid-from / not-authorized).
    for m_ in re.finditer(r".*stream error from peer.*", log):
        failures.append(f"s2sproxy: {m_.group(0)[:300]}")
    for key in ("p12", "p13"):
        for m_ in re.finditer(r".*(invalid-from|not-authorized|unverified|unauthed host).*",
                              world.remotes[key].log_text()):
            failures.append(f"{key}: {m_.group(0)[:300]}")
    # p13db.example's SRV target is a CNAME chain (s2s.p13db -> alias.p13 -> xmpp.p13):
    # s2sproxy followed it to verify p13db's dialback key.
    if not re.search(r"verify connection to s2s\.p13db\.example \[127\.0\.1\.21\]:5269", log):
        failures.append("p13db.example: the CNAME chain was not followed")
    assert not failures, ("\n".join(failures) + "\n" + evidence(log, failing, world)
                          + "\n-- s2sproxy, the tail:\n" + log[-1500:])


FALLBACK_CASES = {
    # domain: (what fails first, the attempt that must fail, bound in seconds)
    "fb-refused.example": ("first SRV target refuses (127.0.1.99)",
                           r"remote connection to dead\.example \[127\.0\.1\.99\]:5269", 5),
    "fb-v6.example": ("AAAA ::1 refuses, A 127.0.1.40 answers",
                      r"remote connection to dual\.fb-v6\.example \[::1\]:5279", 5),
    "fb-nosrv.example": ("no SRV record: the domain's A on 5269",
                         None, 5),
    "fb-cert.example": ("first target's certificate names another domain",
                        r"remote stream 127\.0\.1\.21:5269 closed: policy-violation "
                        r"certificate not trusted", 8),
}


def test_fallback_on_the_real_resolver_path(world, backend):
    """Each broken first way is passed over and the message delivered, within its bound;
    a domain whose SRV target is "." is bounced at once without a connection."""
    alice = W.ALPHA.account(backend.tag)
    targets = [W.BY_NAME[d].account(backend.tag) for d in FALLBACK_CASES]

    async def bounce_none():
        c = await harness.Client.connected(alice, world.trust.bundle)
        try:
            import time
            t0 = time.monotonic()
            c.send_message(f"nobody@{W.NO_SERVICE}", "anyone?")
            err = await c.wait_message(15, match=lambda m: m.type == "error")
            return err.xml, time.monotonic() - t0
        finally:
            await c.close()

    out = harness.run_async(lambda: _sequential(alice, targets, world.trust.bundle), 150)
    none_xml, none_took = harness.run_async(bounce_none, 40)
    log = _log(backend)
    report = []
    failures = []
    for (domain, (what, failed_attempt, bound)), (took, why) in zip(FALLBACK_CASES.items(), out):
        report.append(f"{domain}: {what}: " + (f"delivered in {took:.2f}s" if took is not None
                                                else f"FAILED {why}"))
        if took is None or took > bound:
            failures.append(f"{domain}: {why or f'took {took:.2f}s > {bound}s'}")
        if failed_attempt and not re.search(failed_attempt, log):
            failures.append(f"{domain}: no attempt matching {failed_attempt!r}")
        if not outbound(log, "alpha.example", domain):
            failures.append(f"{domain}: no remote stream ready")
    # fb-refused's second target is dual stack: IPv6 is tried first, and answers.
    if not re.search(r"remote stream ready: alpha\.example -> fb-refused\.example .* "
                     r"peer=::1:5269", log):
        failures.append("fb-refused.example: not reached over IPv6 (::1)")
    cert = outbound(log, "alpha.example", "fb-cert.example")
    if cert and cert[-1]["valid"] != "True":
        failures.append(f"fb-cert.example: {cert}")
    report.append(f"{W.NO_SERVICE}: SRV target '.': bounced in {none_took:.2f}s")
    if "remote-server-not-found" not in none_xml:
        failures.append(f"{W.NO_SERVICE}: {none_xml}")
    if re.search(rf"remote connection to \S+ \[[^]]+\]:\d+ \(\w+[^)]*\) for "
                 rf"{re.escape(W.NO_SERVICE)}", log):
        failures.append(f"{W.NO_SERVICE}: a connection was tried")
    print(f"\n[{backend.version.version}] fallback:\n  " + "\n  ".join(report))
    assert not failures, "\n".join(failures) + "\n" + log[-4000:]


async def _sequential(alice, targets, ca):
    return [await deliver_one(alice, t, ca) for t in targets]


def test_versions_running_are_the_intended_ones(world, backend):
    """The matrix means what it says: each server's own log names its version."""
    ej = r"ejabberd {}(-\S+)? is started"
    want = {backend.ejabberd: ej.format(re.escape(backend.version.version)),
            world.p12: r"Prosody version 0\.12\.3\b", world.p13: r"Prosody version 13\.0\.1\b",
            world.ejr: ej.format(re.escape(versions.EJABBERD_2412.version))}
    for server, pattern in want.items():
        assert re.search(pattern, server.log_text()), f"{server.dir}: no {pattern!r} in its log"


@pytest.mark.parametrize("remote", ["p13.example", "fb-nosrv.example"])
def test_second_domain_pair_on_our_connection(world, backend, remote):
    """XEP-0220 sender multiplexing with a real Prosody (13, then 0.12): s2sproxy has its
    own stream alpha.example -> REMOTE (alice speaks first, or the tests above dialled
    it); bianca@beta.example's message to REMOTE goes on that same connection
    after a second db:result, which Prosody verifies by dialback (calling
    beta.example's authoritative server: s2sproxy, through Knot).  The answer comes back
    either way; stanzas of beta's pair are written only after Prosody said valid."""
    other = W.BY_NAME[remote].account(backend.tag)
    bianca = W.BETA.account(backend.tag)
    first = harness.run_async(lambda: deliver_one(W.ALPHA.account(backend.tag), other,
                                                  world.trust.bundle), 60)
    assert first[0] is not None, first
    log0 = _log(backend)
    assert outbound(log0, "alpha.example", remote), f"no stream of ours to {remote} yet"
    dials_before = len(re.findall(rf"remote connection to \S+ \[[^]]+\]:\d+ \([^)]+\) for "
                                  rf"{re.escape(remote)}\n", log0))
    there = harness.run_async(lambda: deliver_one(bianca, other, world.trust.bundle), 60)
    back = harness.run_async(lambda: deliver_one(other, bianca, world.trust.bundle), 60)
    log = _log(backend)
    assert there[0] is not None, there
    assert back[0] is not None, back
    sid = re.search(rf"remote stream (\S+) multiplexing beta\.example -> {re.escape(remote)} "
                    r"\(dialback\)", log)
    assert sid, log[-4000:]
    assert f"remote stream {sid.group(1)} multiplexing beta.example -> {remote}: valid" in log
    dials = len(re.findall(rf"remote connection to \S+ \[[^]]+\]:\d+ \([^)]+\) for "
                           rf"{re.escape(remote)}\n", log))
    assert dials == dials_before, "a new connection was opened for beta's pair"
    back_way = ("the bidi stream" if not inbound(log, remote, "beta.example")
                else "a connection of its own")
    print(f"\n[{backend.version.version}] beta -> {remote} multiplexed on stream "
          f"{sid.group(1)}: {there[0]:.2f}s; the answer came on {back_way}: {back[0]:.2f}s")
