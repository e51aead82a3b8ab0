from twisted.application.service import ServiceMaker

s2sproxy = ServiceMaker(
    "s2sproxy",
    "s2sproxy.tap",
    "XMPP server-to-server federation proxy and filter for ejabberd",
    "s2sproxy",
)
