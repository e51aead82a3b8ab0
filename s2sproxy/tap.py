"""``twistd s2sproxy``: command-line options and the service."""

from __future__ import annotations

import sys

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


def makeService(options: Options):  # noqa: N802
    from twisted.internet import reactor

    from s2sproxy.logs import set_level
    from s2sproxy.tx.service import Proxy

    settings: Settings = options["settings"]
    set_level(settings.log_level)
    return Proxy(settings, reactor)
