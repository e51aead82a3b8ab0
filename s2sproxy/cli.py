"""``s2sproxy status`` and ``s2sproxy check`` (also ``python -m s2sproxy ...``;
``check`` is ``s2sproxy/check.py``).

``status`` asks the running proxy over its control socket (``control.socket`` in the
configuration file, the same file ``twistd s2sproxy --config`` reads) and prints its
streams, the links not ready, pending iqs and the last flags, as ``prosodyctl shell s2s
show`` does; ``--json`` prints the proxy's answer as it is.
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import tomllib
from pathlib import Path
from typing import Any, Sequence

from s2sproxy.config import DEFAULT_CONFIG_PATH, DEFAULT_CONTROL_SOCKET

MAX_ANSWER = 16 * 1024 * 1024


class CliError(Exception):
    """One line for stderr, exit status 2 (1 is ``check``'s "findings")."""


def control_socket(config: str) -> Path:
    """``control.socket`` of the configuration file, without the rest of start-up's
    checks (which need the private keys): ``status`` may run as another user."""
    path = Path(config)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise CliError(f"cannot read {path}: {e.strerror}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise CliError(f"{path}: not valid TOML: {e}") from None
    value = (data.get("control") or {}).get("socket", DEFAULT_CONTROL_SOCKET)
    if not isinstance(value, str):
        raise CliError(f"{path}: control.socket: must be a string")
    if not value:
        raise CliError(f"{path}: control.socket is \"\": the control socket is off")
    return path.parent.resolve() / value


def ask(sock_path: Path, command: str = "status", timeout: float = 10.0) -> dict:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect(str(sock_path))
        s.sendall(json.dumps({"command": command}).encode() + b"\n")
        data = b""
        while len(data) <= MAX_ANSWER:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    except FileNotFoundError:
        raise CliError(f"no control socket at {sock_path}: is s2sproxy running with this "
                       "configuration?") from None
    except ConnectionRefusedError:
        raise CliError(f"nothing answers on {sock_path}: s2sproxy is not running (a "
                       "stale socket file)") from None
    except PermissionError:
        raise CliError(f"{sock_path}: permission denied (run as root or as the proxy's "
                       "user)") from None
    except OSError as e:
        raise CliError(f"{sock_path}: {e.strerror or e}") from None
    finally:
        s.close()
    try:
        answer = json.loads(data)
    except ValueError:
        raise CliError(f"{sock_path}: the answer is not JSON") from None
    if "error" in answer:
        raise CliError(f"s2sproxy answered: {answer['error']}")
    return answer


def _age(seconds: float) -> str:
    s = int(seconds)
    if s < 120:
        return f"{s}s"
    if s < 7200:
        return f"{s // 60}m"
    if s < 172800:
        return f"{s // 3600}h{(s % 3600) // 60:02d}m"
    return f"{s // 86400}d"


def _table(header: Sequence[str], rows: list[Sequence[Any]]) -> list[str]:
    cells = [list(map(str, header))] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells]


def render_status(st: dict) -> str:
    pid = f" (pid {st['pid']})" if st.get("pid") else ""
    out = [f"s2sproxy {st['version']}{pid} serving {', '.join(st['domains'])}", ""]
    streams = st["streams"]
    out.append(f"Streams ({len(streams)}):")
    rows = []
    for x in streams:
        pairs = x["authenticated"] or x["carries"] or ["-"]
        extra = [p for p in x["carries"] if p not in x["authenticated"]
                 and x["authenticated"]]
        rows.append([x["direction"], x["role"], x["peer"], pairs[0],
                     x["method"] or "-", x["tls"] or "plain", "bidi" if x["bidi"] else "-",
                     _age(x["age"]), f"{x['in_stanzas']}/{x['in_bytes']}",
                     f"{x['out_stanzas']}/{x['out_bytes']}", x["queued"]])
        for p in pairs[1:] + [f"(carries {p})" for p in extra]:
            rows.append(["", "", "", p, "", "", "", "", "", "", ""])
    if rows:
        out += ["  " + ln for ln in _table(
            ["DIR", "ROLE", "PEER", "DOMAINS", "METHOD", "TLS", "BIDI", "AGE",
             "IN st/B", "OUT st/B", "QUEUED"], rows)]
    links = st["links"]
    out += ["", f"Links not ready ({len(links)}):"]
    if links:
        out += ["  " + ln for ln in _table(
            ["TOWARD", "PAIR", "STATE", "QUEUED", "FAILURES", "RETRY IN", "LAST ERROR"],
            [[x["router"], x["pair"], x["state"], x["queued"], x["failures"],
              "-" if x["retry_in"] is None else f"{x['retry_in']}s",
              x["condition"] or "-"] for x in links])]
    out += ["", f"Pending iqs: {st['pending_iqs']}"]
    if st["oldest_iqs"]:
        out += ["  " + ln for ln in _table(
            ["FROM", "TO", "ID", "EXPIRES IN"],
            [[x["from"], x["to"], x["id"], f"{x['expires_in']}s"]
             for x in st["oldest_iqs"]])]
    rtbl = st.get("rtbl") or []
    if rtbl:
        out += ["", f"Real-time block lists ({len(rtbl)}):"]
        out += ["  " + ln for ln in _table(
            ["SOURCE", "SUBSCRIBER", "STATE", "DOMAINS", "SYNCED", "NEXT SYNC",
             "LAST ERROR"],
            [[x["source"], x["subscriber"], x["state"], x["entries"],
              "never" if x["synced_ago"] is None else _age(x["synced_ago"]) + " ago",
              f"in {_age(x['next_sync_in'])}", x["last_error"] or "-"] for x in rtbl])]
    flags = st["last_flags"]
    out += ["", f"Flags: {st['flags_total']} since start; the last {len(flags)}:"]
    if flags:
        out += ["  " + ln for ln in _table(
            ["REASON", "ACTION", "PEER", "DIRECTION", "KIND", "ID", "DETAIL"],
            [[f["reason"], f["action"], f["peer"], f["direction"], f["kind"],
              f["id"] or "-", f["detail"] or "-"] for f in flags])]
    return "\n".join(out) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="s2sproxy", description="Operate a running "
                                 "s2sproxy (it runs as 'twistd s2sproxy').")
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("status", help="streams, links, pending iqs and flags of the "
                       "running proxy")
    p.add_argument("--config", "-c", default=DEFAULT_CONFIG_PATH)
    p.add_argument("--json", action="store_true", help="the proxy's answer as JSON")
    p = sub.add_parser("check", help="the configuration, certificates, secret, the "
                       "ejabberd side, and with --dns the public DNS (exit 1 on findings)")
    p.add_argument("--config", "-c", default=DEFAULT_CONFIG_PATH)
    p.add_argument("--dns", action="store_true", help="also check the public SRV records "
                   "of each served domain")
    p.add_argument("--verbose", "-v", action="store_true", help="print what passed too")
    a = ap.parse_args(argv)
    try:
        if a.command == "check":
            from s2sproxy import check
            findings = check.run(a.config, dns=a.dns)
            for f in findings:
                if a.verbose or f.level != check.OK:
                    sys.stdout.write(f"{f}\n")
            problems = sum(f.level != check.OK for f in findings)
            sys.stdout.write(f"s2sproxy check: {problems} problem(s) in "
                             f"{len(findings)} check(s)\n" if problems else
                             f"s2sproxy check: all {len(findings)} checks passed\n")
            return check.exit_status(findings)
        if a.command == "status":
            answer = ask(control_socket(a.config))
            theirs = answer.get("config") or ""
            if theirs and Path(theirs).resolve() != Path(a.config).resolve():
                sys.stderr.write(f"s2sproxy status: note: the proxy answering (pid "
                                 f"{answer.get('pid')}) runs with {theirs}, not "
                                 f"{a.config}: give each instance its own "
                                 "control.socket\n")
            sys.stdout.write(json.dumps(answer, indent=2) + "\n" if a.json
                             else render_status(answer))
            return 0
    except CliError as e:
        sys.stderr.write(f"s2sproxy {a.command}: {e}\n")
        return 2
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
