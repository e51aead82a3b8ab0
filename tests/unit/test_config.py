"""Configuration mistakes: each is refused at start with one line naming the key."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
from cryptography.hazmat.primitives import serialization

from s2sproxy.config import ConfigError, load
from tests.unit.helpers import certificate


def pem(obj) -> bytes:
    if hasattr(obj, "public_bytes") and not hasattr(obj, "private_bytes"):
        return obj.public_bytes(serialization.Encoding.PEM)
    return obj.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


@pytest.fixture
def conf(tmp_path):
    ca, _ck, leaf, key = certificate("local.example")
    (tmp_path / "local.crt").write_bytes(pem(leaf) + pem(ca))
    (tmp_path / "local.key").write_bytes(pem(key))
    (tmp_path / "ca.crt").write_bytes(pem(ca))
    _ca2, _ck2, other, other_key = certificate("other.example")
    (tmp_path / "other.crt").write_bytes(pem(other))
    (tmp_path / "other.key").write_bytes(pem(other_key))

    def write(extra: str = "", domain: str | None = None) -> str:
        domain = domain if domain is not None else textwrap.dedent("""
            [[domain]]
            name = "local.example"
            certificate = "local.crt"
            key = "local.key"
            """)
        path = tmp_path / "s2sproxy.toml"
        path.write_text('secret_file = "secret"\n' + domain + textwrap.dedent(extra))
        return str(path)
    return write


def error_of(path) -> str:
    with pytest.raises(ConfigError) as e:
        load(path)
    return str(e.value)


def test_config_minimal_is_valid_with_defaults(conf, tmp_path):
    """One domain is enough; the defaults are the documented ones; a secret is made."""
    s = load(conf())
    assert list(s.domains) == ["local.example"]
    assert s.starttls_listeners == ("tcp:5269",)
    assert s.direct_tls_listeners == ("tcp:5270",)
    assert (s.backend.host, s.backend.port, s.backend.srv_port) == ("127.0.0.1", 15269, 15270)
    assert oct((tmp_path / "secret").stat().st_mode & 0o777) == "0o600"
    assert load(conf()).secret == s.secret          # kept, not regenerated


def test_config_missing_domain(conf):
    assert error_of(conf(domain="")) == \
        "domain: missing: add at least one [[domain]] with name, certificate and key"


def test_config_certificate_file_missing(conf, tmp_path):
    path = conf(domain='[[domain]]\nname = "local.example"\ncertificate = "nope.crt"\n'
                       'key = "local.key"\n')
    assert error_of(path) == f"domain[0].certificate: file not found: {tmp_path}/nope.crt"


def test_config_certificate_not_covering_domain(conf, tmp_path):
    path = conf(domain='[[domain]]\nname = "local.example"\ncertificate = "other.crt"\n'
                       'key = "other.key"\n')
    assert error_of(path) == (f"domain[0].certificate: {tmp_path}/other.crt does not cover "
                              f"local.example (names: other.example)")


def test_config_certificate_not_matching_key(conf, tmp_path):
    path = conf(domain='[[domain]]\nname = "local.example"\ncertificate = "local.crt"\n'
                       'key = "other.key"\n')
    assert error_of(path) == (f"domain[0].certificate: {tmp_path}/local.crt does not match "
                              f"its private key {tmp_path}/other.key")


def test_config_certificate_not_pem(conf, tmp_path):
    (tmp_path / "junk.crt").write_text("hello")
    path = conf(domain='[[domain]]\nname = "local.example"\ncertificate = "junk.crt"\n'
                       'key = "local.key"\n')
    assert error_of(path) == f"domain[0].certificate: no PEM certificate in {tmp_path}/junk.crt"


def test_config_bad_domain_name(conf):
    path = conf(domain='[[domain]]\nname = "bad domain"\ncertificate = "local.crt"\n'
                       'key = "local.key"\n')
    assert error_of(path).startswith("domain[0].name: not a valid domain name: 'bad domain'")


def test_config_unknown_key(conf):
    assert error_of(conf("[backend]\nhots = 'x'\n")).startswith(
        "backend.hots: unknown key (known here: ")


def test_config_wrong_type(conf):
    assert error_of(conf("[backend]\nport = 'x'\n")) == \
        "backend.port: must be a port number 1-65535, not 'x'"


def test_config_bad_endpoint(conf):
    assert error_of(conf("[public]\nstarttls = ['tpc:5269']\n")).startswith(
        "public.starttls[0]: not a Twisted server endpoint string: 'tpc:5269'")


def test_config_tls_endpoint_refused(conf):
    assert "s2sproxy does TLS itself" in error_of(
        conf("[public]\ndirect_tls = ['ssl:5270:privateKey=k.pem']\n"))


def test_config_bad_backend_tls_mode(conf):
    assert error_of(conf("[backend]\ntls = 'sometimes'\n")) == \
        "backend.tls: must be auto, required or never, not 'sometimes'"


def test_config_bad_remote_override(conf):
    assert error_of(conf('[remote."remote.example"]\nstarttls = ["host:port"]\n')) == \
        "remote.\"remote.example\".starttls[0]: bad port in 'host:port'"


def test_config_ca_file_missing(conf, tmp_path):
    assert error_of(conf("[trust]\nca_file = 'none.pem'\n")) == \
        f"trust.ca_file: file not found: {tmp_path}/none.pem"


def test_config_domain_both_secure_and_insecure(conf):
    assert error_of(conf("[trust]\nsecure_domains = ['a.example']\n"
                         "insecure_domains = ['a.example']\n")) == \
        "trust.insecure_domains: a.example is also in trust.secure_domains"


def test_config_not_toml(conf, tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("this is = = not toml")
    assert error_of(path).startswith(f"{path}: not valid TOML: ")


def test_config_short_secret(conf, tmp_path):
    (tmp_path / "secret").write_text("short")
    assert error_of(conf()) == (f"secret_file: {tmp_path}/secret holds fewer than 16 bytes; "
                                "delete it to have a new secret generated")


def test_twistd_exits_non_zero_with_one_line(conf, tmp_path):
    """`twistd s2sproxy` with a broken config prints one line naming the key, exit 2."""
    path = conf("[backend]\nport = 0\n")
    twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    r = subprocess.run([twistd, "-n", "--pidfile=", "s2sproxy", "--config", path],
                       capture_output=True, text=True, timeout=60, env=env, cwd=tmp_path)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        "s2sproxy: configuration error: backend.port: must be a port number 1-65535, not 0"]


def test_config_example_file_is_valid(conf, tmp_path):
    """deploy/s2sproxy.example.toml, with a real certificate, loads: every key it shows
    is a key s2sproxy knows, with a valid value."""
    import pathlib
    import tomllib
    from s2sproxy.config import parse
    example = pathlib.Path(__file__).resolve().parents[2] / "deploy" / "s2sproxy.example.toml"
    data = tomllib.loads(example.read_text())
    data["domain"] = [{"name": "local.example", "certificate": "local.crt",
                       "key": "local.key"}]
    data["secret_file"] = "secret"
    s = parse(data, base=tmp_path)
    assert (s.queue.limit, s.idle_timeout, s.backend.trusted_addresses) == \
        (1000, 600.0, frozenset())


def test_config_policy_action_not_allowed_for_reason(conf):
    """An action a reason does not allow is refused, naming the choices."""
    assert error_of(conf('[policy.actions]\n"invalid-from" = "forward"\n')) == \
        'policy.actions."invalid-from": must be one of close, drop, not \'forward\''


def test_config_policy_unknown_reason(conf):
    assert error_of(conf('[policy.actions]\n"spam" = "drop"\n')).startswith(
        'policy.actions."spam": unknown reason code (known: unsolicited-iq-response')


def test_readme_documents_every_reason_and_config_key():
    """Each reason code and each config section appears in README.md."""
    import pathlib
    from s2sproxy.config import _TOP_KEYS
    from s2sproxy.policy.classify import REASONS
    readme = (pathlib.Path(__file__).resolve().parents[2] / "README.md").read_text()
    assert all(f"`{name}`" in readme for name in REASONS)
    assert all(key in readme for key in _TOP_KEYS)


def test_config_allow_private_targets_defaults_to_false(conf):
    """dns.allow_private_targets is off unless set, and must be a boolean."""
    assert load(conf()).allow_private_targets is False
    assert load(conf("[dns]\nallow_private_targets = true\n")).allow_private_targets is True
    assert error_of(conf("[dns]\nallow_private_targets = 'yes'\n")) == \
        "dns.allow_private_targets: must be true or false, not 'yes'"


def test_config_own_listeners_are_every_tcp_address_we_listen_on(conf):
    """The addresses a remote's DNS must never make us connect to: public, backend,
    metrics and backend DNS listeners (an unspecified interface as 0.0.0.0 or ::)."""
    from s2sproxy.config import own_listeners
    s = load(conf("""
        [public]
        starttls = ["tcp:5269", "haproxy:tcp:5279:interface=192.0.2.1"]
        direct_tls = ["tcp6:port=5270:interface=\\\\:\\\\:1"]
        [metrics]
        listen = "tcp:9269:interface=127.0.0.1"
        """))
    assert own_listeners(s) == [("0.0.0.0", 5269), ("192.0.2.1", 5279), ("::1", 5270),
                                ("127.0.0.1", 15270), ("127.0.0.1", 9269),
                                ("127.0.0.1", 15353)]


def test_config_trust_domains_are_canonical(conf):
    """trust.secure_domains written in fullwidth or as an A-label names the same
    domain as the stream headers do (UTS #46, U-labels)."""
    s = load(conf('[trust]\nsecure_domains = ["ＥＸＡＭＰＬＥ.com", "xn--bcher-kva.example"]\n'))
    assert s.trust.secure_domains == frozenset({"example.com", "bücher.example"})


def test_config_trust_domain_in_both_lists_under_two_spellings(conf):
    """A U-label and its A-label are one domain: in both lists, it is refused."""
    assert error_of(conf('[trust]\nsecure_domains = ["bücher.example"]\n'
                         'insecure_domains = ["XN--BCHER-KVA.example"]\n')) == (
        "trust.insecure_domains: bücher.example is also in trust.secure_domains")


def test_config_outgoing_multiplex_defaults_to_true(conf):
    """outgoing.multiplex (XEP-0220 sender multiplexing on our streams to remotes) is
    on unless set to false, and must be a boolean; [outgoing] knows no other key."""
    assert load(conf()).multiplex is True
    assert load(conf("[outgoing]\nmultiplex = false\n")).multiplex is False
    assert error_of(conf("[outgoing]\nmultiplex = 1\n")) == \
        "outgoing.multiplex: must be true or false, not 1"
    assert error_of(conf("[outgoing]\nmultiplexing = true\n")).startswith(
        "outgoing.multiplexing: unknown key")


def test_config_rtbl_entries(conf):
    s = load(conf("""
        [filter]
        rtbl_refresh = 600
        [[filter.rtbl]]
        service = "XMPPBL.org"
        [[filter.rtbl]]
        service = "rtbl.example"
        node = "spam_source_jids_sha256"
        ids = "sha256"
        domain = "local.example"
        """))
    assert s.filter.rtbl_refresh == 600
    assert [(r.service, r.node, r.ids, r.subscriber) for r in s.filter.rtbl] == [
        ("xmppbl.org", "spam_source_domains", "domain", "local.example/s2sproxy-rtbl"),
        ("rtbl.example", "spam_source_jids_sha256", "sha256",
         "local.example/s2sproxy-rtbl")]
    assert load(conf()).filter.rtbl == ()


@pytest.mark.parametrize("entry, key", [
    ('node = "n"', "filter.rtbl[0].service: missing"),
    ('service = "a b"', "filter.rtbl[0].service: not a domain"),
    ('service = "x.org"\nids = "md5"', "filter.rtbl[0].ids: must be domain or sha256"),
    ('service = "x.org"\ndomain = "other.example"', "filter.rtbl[0].domain: must be a "
                                                    "served domain"),
    ('service = "local.example"', "filter.rtbl[0].service: local.example is a served"),
    ('service = "x.org"\ncolour = 1', "filter.rtbl[0].colour: unknown key"),
])
def test_config_rtbl_mistakes(conf, entry, key):
    assert error_of(conf("[[filter.rtbl]]\n" + entry + "\n")).startswith(key)


def test_config_rtbl_refresh_floor(conf):
    assert error_of(conf("[filter]\nrtbl_refresh = 1\n")).startswith(
        "filter.rtbl_refresh: must be at least 10")


@pytest.mark.parametrize("extra, key", [
    ("[timeouts]\nidle = nan\n", "timeouts.idle: must be a number of seconds > 0"),
    ("[timeouts]\nconnect = inf\n", "timeouts.connect: must be a number of seconds > 0"),
    ("[filter]\nrtbl_refresh = nan\n", "filter.rtbl_refresh: must be a number"),
    ("[ratelimit]\nclose_after = nan\n", "ratelimit.close_after: must be a number >= 0"),
    ('[filter]\nmode = "allow"\nallow = ["a.example"]\n[[filter.rtbl]]\n'
     'service = "x.org"\n', "filter.rtbl: denies nothing with filter.mode"),
    ('[[filter.rtbl]]\nservice = "x.org"\n[[filter.rtbl]]\nservice = "x.org"\n'
     'ids = "sha256"\n', "filter.rtbl[1]: rtbl x.org/spam_source_domains is listed twice"),
])
def test_config_numbers_must_be_finite_and_rtbl_consistent(conf, extra, key):
    assert error_of(conf(extra)).startswith(key)
