"""Real-time block lists (policy.rtbl): the requests we send, the answers and pubsub
notifications a service sends back (byte transcripts as Prosody's mod_pubsub writes
them), and what the domain filter denies after each."""

from __future__ import annotations

import hashlib
import itertools

from lxml import etree

from s2sproxy.core.limits import RTBL_IQ_TIMEOUT, RTBL_RETRY_BASE
from s2sproxy.core.stanza import Stanza
from s2sproxy.policy import rtbl as RT
from s2sproxy.policy.domains import DomainFilter

LOCAL = "local.example"
SERVICE = "rtbl.example"
JID = f"{LOCAL}/{RT.RESOURCE}"
SRC = RT.parse_source(SERVICE, "spam_source_domains", "domain", LOCAL)


def stanza(raw: str) -> Stanza:
    """A stanza as the framer hands it over: its bytes and head fields."""
    el = etree.fromstring(raw)
    frm, to = el.get("from", ""), el.get("to", "")
    dom = lambda j: j.split("@")[-1].split("/")[0].lower()  # noqa: E731
    child = el[0].tag.split("}")[0][1:] if len(el) and "}" in el[0].tag else None
    return Stanza(etree.QName(el).localname, raw.encode(), frm, to, el.get("type"),
                  el.get("id"), child, dom(frm), dom(to))


def make(sources=(SRC,), refresh=3600.0):
    f = DomainFilter()
    counter = itertools.count(1)
    r = RT.Rtbl(f, lambda: f"q{next(counter)}")
    assert r.configure(sources, refresh, 0.0) == []
    return r, f


def sends(decisions) -> list[bytes]:
    return [d.stanza.raw for d in decisions if type(d) is RT.Send]


def items_result(iq_id: str, *ids: str, node="spam_source_domains") -> Stanza:
    items = "".join(f"<item id='{i}'><x xmlns='urn:example:report'/></item>" for i in ids)
    return stanza(f"<iq xmlns='jabber:server' type='result' id='{iq_id}' from='{SERVICE}' "
                  f"to='{JID}'><pubsub xmlns='{RT.NS_PUBSUB}'><items node='{node}'>"
                  f"{items}</items></pubsub></iq>")


def subscribe_result(iq_id: str, state="subscribed") -> Stanza:
    return stanza(f"<iq xmlns='jabber:server' type='result' id='{iq_id}' from='{SERVICE}' "
                  f"to='{JID}'><pubsub xmlns='{RT.NS_PUBSUB}'><subscription "
                  f"node='spam_source_domains' jid='{JID}' subscription='{state}'/>"
                  f"</pubsub></iq>")


def event(body: str, frm=SERVICE) -> Stanza:
    return stanza(f"<message xmlns='jabber:server' from='{frm}' to='{JID}' type='headline' "
                  f"id='e1'><event xmlns='{RT.NS_EVENT}'>{body}</event></message>")


def synced(r, now=1.0, ids=("spam.example", "*.bad.example")):
    out = r.poll(now)
    assert len(sends(out)) == 2
    rest, got = r.take([subscribe_result("q1"), items_result("q2", *ids)], now)
    assert rest == []
    return got


def test_first_poll_subscribes_then_fetches_the_whole_node():
    r, _ = make()
    out = sends(r.poll(1.0))
    assert out == [
        (f"<iq type='set' id='q1' from='{JID}' to='{SERVICE}'><pubsub xmlns='{RT.NS_PUBSUB}'>"
         f"<subscribe node='spam_source_domains' jid='{JID}'/></pubsub></iq>").encode(),
        (f"<iq type='get' id='q2' from='{JID}' to='{SERVICE}'><pubsub xmlns='{RT.NS_PUBSUB}'>"
         f"<items node='spam_source_domains'/></pubsub></iq>").encode()]
    assert r.poll(2.0) == []        # nothing more while both wait for their answer


def test_items_answer_denies_its_domains_and_answers_are_consumed():
    r, f = make()
    got = synced(r)
    assert RT.Subscribed(SRC.name, "subscribed") in got
    assert RT.Synced(SRC.name, 2, 2, 0, 0) in got
    assert f.active
    assert f.verdict("spam.example") == "rtbl rtbl.example/spam_source_domains: spam.example"
    assert f.verdict("x.bad.example") is not None
    assert f.verdict("good.example") is None
    assert f.verdict(SERVICE) is None       # rule 6


def test_publish_retract_purge_notifications():
    r, f = make()
    synced(r)
    version = f.version
    rest, got = r.take([event("<items node='spam_source_domains'><item id='new.example'>"
                              "<x xmlns='urn:example:report'/></item></items>")], 5.0)
    assert rest == [] and got == [RT.Updated(SRC.name, ("new.example",), ())]
    assert f.verdict("new.example") is not None and f.version > version
    _, got = r.take([event("<items node='spam_source_domains'><retract id='spam.example'/>"
                           "</items>")], 6.0)
    assert got == [RT.Updated(SRC.name, (), ("spam.example",))]
    assert f.verdict("spam.example") is None and f.verdict("new.example") is not None
    _, got = r.take([event("<items node='other_node'><item id='other.example'/></items>")],
                    7.0)
    assert got == [] and f.verdict("other.example") is None
    _, got = r.take([event("<purge node='spam_source_domains'/>")], 8.0)
    assert got[0].purged and f.verdict("new.example") is None and not f.active


def test_delete_and_lost_subscription_sync_again():
    r, f = make()
    synced(r)
    _, got = r.take([event(f"<subscription node='spam_source_domains' jid='{JID}' "
                           "subscription='none'/>")], 10.0)
    assert sends(r.poll(10.0)) != []        # resubscribed at once
    r2, f2 = make()
    synced(r2)
    r2.take([event("<delete node='spam_source_domains'/>")], 10.0)
    assert f2.verdict("spam.example") is None
    assert r2.poll(10.0 + RTBL_RETRY_BASE - 0.1) == []
    assert len(sends(r2.poll(10.0 + RTBL_RETRY_BASE))) == 2


def test_notifications_from_anyone_else_are_not_trusted():
    r, f = make()
    synced(r)
    for spoof in (event("<items node='spam_source_domains'><retract id='spam.example'/>"
                        "</items>", frm="other.example"),
                  event("<items node='spam_source_domains'><retract id='spam.example'/>"
                        "</items>", frm=f"admin@{SERVICE}")):
        rest, got = r.take([spoof], 5.0)
        assert rest == [] and [type(d) for d in got] == [RT.Unexpected]
    assert f.verdict("spam.example") is not None
    # an answer with our id but from elsewhere is no answer either
    r.poll(RTBL_IQ_TIMEOUT * 100)
    pending = next(iter(r.subs.values())).pending
    iq_id = next(iter(pending))
    forged = stanza(f"<iq xmlns='jabber:server' type='error' id='{iq_id}' "
                    f"from='other.example' to='{JID}'/>")
    _, got = r.take([forged], RTBL_IQ_TIMEOUT * 100)
    assert [type(d) for d in got] == [RT.Unexpected] and iq_id in pending


def test_other_stanzas_pass_untouched_and_in_order():
    r, _ = make()
    a = stanza(f"<message xmlns='jabber:server' from='u@x.example' to='alice@{LOCAL}'/>")
    b = stanza(f"<message xmlns='jabber:server' from='u@x.example' to='{LOCAL}/other'/>")
    rest, got = r.take([a, b], 1.0)
    assert rest == [a, b] and got == []
    probe = stanza(f"<iq xmlns='jabber:server' type='get' id='v' from='u@x.example/r' "
                   f"to='{JID}'><query xmlns='jabber:iq:version'/></iq>")
    rest, got = r.take([a, probe, b], 1.0)
    assert rest == [a, b] and [type(d) for d in got] == [RT.Unexpected]


def test_failures_retry_with_backoff_and_keep_what_was_held():
    r, f = make(refresh=600.0)
    synced(r)
    assert sends(r.poll(601.0))             # the periodic sync
    err = stanza(f"<iq xmlns='jabber:server' type='error' id='q3' from='{SERVICE}' "
                 f"to='{JID}'><error type='cancel'><remote-server-not-found "
                 f"xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/></error></iq>")
    _, got = r.take([err], 602.0)
    assert got == [RT.Failed(SRC.name, "subscribe", "remote-server-not-found",
                             RTBL_RETRY_BASE)]
    assert f.verdict("spam.example") is not None    # still in force
    # the items request of the same sync times out: still one failed sync
    got = r.poll(601.0 + RTBL_IQ_TIMEOUT)
    assert got == [RT.Failed(SRC.name, "items", f"no answer within {RTBL_IQ_TIMEOUT:g} s",
                             RTBL_RETRY_BASE)]
    t = 601.0 + RTBL_IQ_TIMEOUT
    assert r.poll(t + RTBL_RETRY_BASE - 0.1) == []
    assert len(sends(r.poll(t + RTBL_RETRY_BASE))) == 2
    # the next sync fails too: the delay doubles
    t += RTBL_RETRY_BASE
    got = r.poll(t + RTBL_IQ_TIMEOUT)
    assert [d.retry_in for d in got] == [2 * RTBL_RETRY_BASE] * 2
    assert r.poll(t + RTBL_IQ_TIMEOUT + 2 * RTBL_RETRY_BASE - 0.1) == []
    assert len(sends(r.poll(t + RTBL_IQ_TIMEOUT + 2 * RTBL_RETRY_BASE))) == 2
    row = r.rows(t)[0]
    assert row["state"] == "failed" and row["last_error"] == "items: no answer within 60 s"


def test_bad_ids_are_skipped_and_counted():
    r, f = make()
    got = synced(r, ids=("ok.example", "user@bad.example", "a b"))
    assert RT.Synced(SRC.name, 1, 1, 0, 2) in got
    assert f.verdict("ok.example") is not None


def test_sha256_ids():
    src = RT.parse_source(SERVICE, "spam_source_domains_sha256", "sha256", LOCAL)
    r, f = make((src,))
    h = hashlib.sha256(b"hashed.example").hexdigest()
    r.poll(1.0)
    _, got = r.take([subscribe_result("q1"), items_result(
        "q2", h.upper(), "not-a-hash", node="spam_source_domains_sha256")], 1.0)
    assert RT.Synced(src.name, 1, 1, 0, 1) in got
    assert f.verdict("hashed.example") == f"{src.name}: sha256(hashed.example)"
    assert f.verdict("other.example") is None


def test_reconfigure_keeps_entries_and_unsubscribes_removed_sources():
    r, f = make()
    synced(r)
    assert r.configure([SRC], 1800.0, 5.0) == []
    assert f.verdict("spam.example") is not None
    out = r.configure([], 1800.0, 6.0)
    assert [b"<unsubscribe node='spam_source_domains'" in x for x in sends(out)] == [True]
    assert f.verdict("spam.example") is None and not f.active
    unsub_id = out[0].stanza.id
    # rule 7: until the service answers, what comes for the JID is still ours
    assert r.active
    note = event("<items node='spam_source_domains'><item id='late.example'/></items>")
    rest, got = r.take([note], 7.0)
    assert rest == [] and [type(d) for d in got] == [RT.Ignored]
    assert f.verdict("late.example") is None
    # no answer in time: asked again
    got = r.poll(6.0 + RTBL_IQ_TIMEOUT)
    assert [type(d) for d in got] == [RT.Failed]
    again = sends(r.poll(6.0 + RTBL_IQ_TIMEOUT + RTBL_RETRY_BASE))
    assert len(again) == 1 and b"<unsubscribe " in again[0]
    answer = stanza(f"<iq xmlns='jabber:server' type='result' id='q4' from='{SERVICE}' "
                    f"to='{JID}'/>")
    assert unsub_id == "q3"
    _, got = r.take([answer], 100.0)
    assert got == [RT.Unsubscribed(SRC.name, "result")] and not r.active
    rest, _ = r.take([note], 101.0)
    assert rest == [note]       # no longer ours: an ordinary stanza again


def test_subscriber_jid_matched_canonically():
    r, f = make()
    synced(r)
    upper = stanza(f"<message xmlns='jabber:server' from='{SERVICE}' "
                   f"to='LOCAL.Example/{RT.RESOURCE}'><event xmlns='{RT.NS_EVENT}'><items "
                   f"node='spam_source_domains'><item id='up.example'/></items></event>"
                   f"</message>")
    upper.to_domain = LOCAL         # as the framer canonicalises it
    rest, got = r.take([upper], 2.0)
    assert rest == [] and f.verdict("up.example") is not None
    other = stanza(f"<message xmlns='jabber:server' from='{SERVICE}' "
                   f"to='user@{LOCAL}/{RT.RESOURCE}'/>")
    assert r.take([other], 2.0) == ([other], [])


def test_subscription_none_in_the_pubsub_namespace_and_duplicate_ids():
    r, f = make()
    synced(r, ids=("dup.example", "DUP.example"))
    assert r.rows(1.0)[0]["entries"] == 1
    _, got = r.take([event("<items node='spam_source_domains'><retract id='DUP.example'/>"
                           "</items>")], 2.0)
    assert f.verdict("dup.example") is not None     # the other id still lists it
    msg = stanza(f"<message xmlns='jabber:server' from='{SERVICE}' to='{JID}'><pubsub "
                 f"xmlns='{RT.NS_PUBSUB}'><subscription node='spam_source_domains' "
                 f"jid='{JID}' subscription='none'/></pubsub></message>")
    r.take([msg], 3.0)
    assert len(sends(r.poll(3.0))) == 2
    plain = stanza(f"<message xmlns='jabber:server' from='{SERVICE}' to='{JID}'><body>hi"
                   f"</body></message>")
    assert [type(d) for d in r.take([plain], 4.0)[1]] == [RT.Ignored]
