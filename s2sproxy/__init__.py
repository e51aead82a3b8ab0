"""s2sproxy: an XMPP server-to-server federation proxy and filter for ejabberd."""

__version__ = "0.1.0"
