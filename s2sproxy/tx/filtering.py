"""``[filter]`` on the tx side: the blocklist files (read at start and at each reload,
and again when a file's modification time changes, checked every tick), the real-time
block lists (``policy.rtbl``: its requests sent, its answers and notifications taken
out of the stanzas that arrive, its facts logged), and closing the streams of a remote
that a change denies.  What is denied is decided by ``policy.domains``."""

from __future__ import annotations

import secrets
import stat
from pathlib import Path
from typing import TYPE_CHECKING

from s2sproxy.core.inbound import InboundStream, Role
from s2sproxy.core.limits import MAX_BLOCKLIST_BYTES, MAX_REPORTED_BAD_LINES
from s2sproxy.logs import get_logger
from s2sproxy.policy import rtbl as RT
from s2sproxy.policy.domains import DomainFilter, parse_blocklist

if TYPE_CHECKING:
    from s2sproxy.tx.service import Proxy

log = get_logger(__name__)


class Filtering:
    def __init__(self, proxy: "Proxy") -> None:
        self.proxy = proxy
        self.domains = DomainFilter()       # changed in place: streams hold it
        # path -> (mtime_ns, size, inode) read, or ("failed", why)
        self.files: dict[Path, tuple] = {}
        self.rtbl = RT.Rtbl(self.domains, new_rtbl_id)

    def configure(self, lists, deny_files, rtbl=(), rtbl_refresh: float = 3600.0) -> None:
        self.domains.set_lists(*lists)
        for path in set(self.files) - set(deny_files):
            self.domains.set_file(str(path), None)
            del self.files[path]
        for path in deny_files:
            self.read(path)
        self.run(self.rtbl.configure(rtbl, rtbl_refresh, self.proxy.reactor.seconds()))
        self.enforce()

    def read(self, path: Path, force: bool = True) -> None:
        """Read a blocklist file (``filter.deny_files``) if it changed (modification
        time, size or inode); a bad line is one warn line with its number and skipped.
        A file that cannot be read, is not a regular file, or is larger than
        ``MAX_BLOCKLIST_BYTES`` keeps what was read from it before (one error line)."""
        try:
            st = path.stat()
            seen = (st.st_mtime_ns, st.st_size, st.st_ino)
            if not force and self.files.get(path) == seen:
                return
            if not stat.S_ISREG(st.st_mode):
                raise OSError(0, "not a regular file")
            if st.st_size > MAX_BLOCKLIST_BYTES:
                raise OSError(0, f"larger than {MAX_BLOCKLIST_BYTES} bytes")
            with open(path, "rb") as f:
                text = f.read(MAX_BLOCKLIST_BYTES + 1).decode("utf-8", errors="replace")
        except OSError as e:
            failed = ("failed", getattr(e, "strerror", str(e)))
            if self.files.get(path) != failed:
                log.error("filter.deny_files: cannot read {path}: {err}; keeping what was "
                          "read from it", path=str(path), err=failed[1])
            self.files[path] = failed
            return
        entries, errors = parse_blocklist(text)
        for n, why in errors[:MAX_REPORTED_BAD_LINES]:
            log.warn("filter.deny_files: {path} line {n}: {why}; skipped", path=str(path),
                     n=n, why=why)
        if len(errors) > MAX_REPORTED_BAD_LINES:
            log.warn("filter.deny_files: {path}: {more} more bad lines skipped",
                     path=str(path), more=len(errors) - MAX_REPORTED_BAD_LINES)
        self.domains.set_file(str(path), entries)
        self.files[path] = seen
        log.info("filter.deny_files: {path}: {n} domains", path=str(path), n=len(entries))

    def tick(self, now: float) -> None:
        if not self.files and not self.rtbl.active:
            return
        version = self.domains.version
        for path in list(self.files):
            self.read(path, force=False)
        if self.rtbl.active:
            self.run(self.rtbl.poll(now))
        if self.domains.version != version:
            self.enforce()

    # -- real-time block lists (``policy.rtbl``) ---------------------------------------

    def take(self, stanzas: list) -> list:
        """The stanzas that are not the RTBL's own (answers, notifications, what else
        comes for its JID); a change of a list closes what it now denies."""
        version = self.domains.version
        rest, decisions = self.rtbl.take(stanzas, self.proxy.reactor.seconds())
        if decisions:
            self.run(decisions)
        if self.domains.version != version:
            self.enforce()
        return rest

    def run(self, decisions: list) -> None:
        for d in decisions:
            t = type(d)
            if t is RT.Send:
                self.proxy.send_generated([d.stanza])
            elif t is RT.Synced:
                log.info("{name}: {total} domains ({added} added, {removed} removed"
                         "{skipped})", name=d.name, total=d.total, added=d.added,
                         removed=d.removed, skipped=_skipped(d.skipped))
            elif t is RT.Updated:
                log.info("{name}: {what}{skipped}", name=d.name, skipped=_skipped(
                    d.skipped), what="; ".join(x for x in (
                        "purged" if d.purged else "",
                        "added " + ", ".join(d.added) if d.added else "",
                        "removed " + ", ".join(d.removed) if d.removed and not d.purged
                        else "") if x) or "no change")
            elif t is RT.Subscribed:
                log.info("{name}: subscription {state}", name=d.name, state=d.state)
            elif t is RT.Failed:
                log.warn("{name}: {request} request failed: {condition}; trying again in "
                         "{retry:g} s (what the list held stays in force)", name=d.name,
                         request=d.request, condition=d.condition, retry=d.retry_in)
            elif t is RT.Unsubscribed:
                log.info("{name}: unsubscribed ({answer}): no longer configured",
                         name=d.name, answer=d.answer)
            elif t is RT.Ignored:
                log.debug("{stanza} for the RTBL subscriber: {why}; ignored",
                          stanza=repr(d.stanza), why=d.why)
            elif t is RT.Unexpected:
                # one line per stanza: bounce's "bouncing ..." (info) says what it was
                log.debug("{stanza} for the RTBL subscriber: {why}", stanza=repr(d.stanza),
                          why=d.why)
                self.proxy.bounce(d.stanza, "service-unavailable", d.why)

    def enforce(self) -> None:
        """After ``[filter]`` changed: streams of remotes now denied are closed with
        ``policy-violation`` (what they had sent is delivered; what waits for them
        bounces as they go)."""
        if not self.domains.active:
            return
        verdict = self.domains.verdict
        router = self.proxy.to_remote
        for pair in [p for p, link in router.links.items() if link.queue]:
            if pair[1] not in self.proxy.served and verdict(pair[1]) is not None:
                self.proxy.refuse_queued(pair)
        for proto in list(self.proxy.streams):
            st = proto.stream
            if proto.closing:
                continue
            if isinstance(st, InboundStream):
                remotes = {o for o, _r in st.authenticated} if st.role is Role.PUBLIC \
                    else set()
            else:
                f = getattr(proto, "factory", None)
                remotes = {f.pair[1]} if f is not None and f.label == "remote" else set()
            denied = sorted(d for d in remotes if verdict(d) is not None)
            if denied:
                log.info("{label} stream {peer}: {remotes} now denied by [filter]: closed",
                         label=proto.label, peer=proto.peer, remotes=", ".join(denied))
                proto.run(st.fail("policy-violation",
                                  f"{denied[0]} may not federate with this server"))


def new_rtbl_id() -> str:
    return "s2sproxy-rtbl-" + secrets.token_hex(10)


def _skipped(n: int) -> str:
    return f"; {n} bad or surplus item ids skipped" if n else ""
