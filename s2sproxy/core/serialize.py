"""Writing XML by hand, for the few elements s2sproxy composes itself (headers,
features, dialback, errors, bounces): explicit strings with escaped values avoid lxml's
namespace-prefix and namespace-repetition traps on the per-stream path."""

from __future__ import annotations


def escape(value: str) -> str:
    """Escape for both text and single- or double-quoted attribute values."""
    return (value.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
            .replace("'", "&apos;").replace('"', "&quot;"))
