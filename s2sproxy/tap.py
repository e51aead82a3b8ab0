"""``twistd s2sproxy``: command-line options and the service."""

from __future__ import annotations

import sys

from twisted.application import service
from twisted.logger import ILogObserver
from twisted.python import usage

from s2sproxy.config import DEFAULT_CONFIG_PATH, ConfigError, Settings, load


class Options(usage.Options):
    synopsis = "[--config FILE]"
    longdesc = ("XMPP server-to-server federation proxy and filter in front of an "
                "unmodified ejabberd.  See README.md for every configuration key.")
    optParameters = [
        ["config", "c", DEFAULT_CONFIG_PATH, "TOML configuration file."],
    ]

    def postOptions(self) -> None:  # noqa: N802
        try:
            self["settings"] = load(self["config"])
        except ConfigError as e:
            # One line naming the key; non-zero exit before twistd daemonises.
            sys.stderr.write(f"s2sproxy: configuration error: {e}\n")
            raise SystemExit(2) from None


class _LogObserverOwner(service.MultiService):
    """Gives the twistd application the JSON observer (``log.format = "json"``):
    twistd's logger takes an ``ILogObserver`` component of the application before its
    own ``--logfile`` observer."""

    def __init__(self, child: service.IService, observer) -> None:
        super().__init__()
        self.observer = observer
        child.setServiceParent(self)

    def setServiceParent(self, parent) -> None:  # noqa: N802
        super().setServiceParent(parent)
        set_component = getattr(parent, "setComponent", None)
        if set_component is not None:
            set_component(ILogObserver, self.observer)


def _json_log_file(twistd: usage.Options | None):
    """Where twistd would write its log: ``--logfile`` (``-``: standard output), else
    standard output with ``--nodaemon`` and ``twistd.log`` without."""
    name = twistd.get("logfile") if twistd is not None else "-"
    nodaemon = twistd.get("nodaemon", True) if twistd is not None else True
    if name == "-" or (nodaemon and not name):
        return sys.stdout
    import signal

    from twisted.python import logfile
    f = logfile.LogFile.fromFullPath(name or "twistd.log")
    from twisted.internet import reactor
    # as twistd does for its own: rotated in the reactor, not in the signal handler
    signal.signal(signal.SIGUSR1, lambda *_: reactor.callFromThread(f.rotate))
    return f


def makeService(options: Options):  # noqa: N802
    from twisted.internet import reactor

    from s2sproxy.logs import JsonLinesObserver, set_level
    from s2sproxy.tx.service import Proxy

    settings: Settings = options["settings"]
    set_level(settings.log_level)
    proxy = Proxy(settings, reactor, config_path=options["config"])
    if settings.log_format == "json":
        return _LogObserverOwner(proxy, JsonLinesObserver(_json_log_file(options.parent)))
    return proxy
