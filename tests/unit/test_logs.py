"""log.level filters s2sproxy's own events."""

from twisted.logger import globalLogPublisher

from s2sproxy.logs import get_logger, set_level


def test_log_level_filters_our_events():
    """Events below the configured level never reach twistd's observers."""
    seen = []
    globalLogPublisher.addObserver(seen.append)
    try:
        log = get_logger("s2sproxy.test")
        set_level("info")
        log.debug("hidden")
        log.info("shown")
        set_level("debug")
        log.debug("now shown")
        set_level("warn")
        log.info("hidden again")
        log.warn("warning")
    finally:
        globalLogPublisher.removeObserver(seen.append)
        set_level("info")
    assert [e["log_format"] for e in seen if e.get("log_namespace") == "s2sproxy.test"] == \
        ["shown", "now shown", "warning"]
