"""What a query is, for the server and the offline labeler alike: text, valid UTF-8, not empty once normalised
(`querytune.schema.normalize_text`: NFKC, lower case, collapsed whitespace), at most `MAX_QUERY_CHARS`, no control
characters (`check_query`)."""

from __future__ import annotations

import json
from typing import Any

from querytune.schema import normalize_text

MAX_QUERY_CHARS = 256  # longest query accepted and put in a prompt: longer "queries" are pasted documents


def lone_surrogate(value: Any) -> str | None:
    """Why `value` (text, or JSON-like data) cannot be written as UTF-8, or None. A lone surrogate comes from a JSON
    "\\ud800" escape, or stands for a byte that was not UTF-8 when a file is read with errors="surrogateescape".

    >>> lone_surrogate({"q": "caf\\udce9"})
    'invalid UTF-8 or lone surrogate U+DCE9'
    """
    try:
        (value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str)).encode("utf-8")
    except UnicodeEncodeError as e:
        return f"invalid UTF-8 or lone surrogate U+{ord(e.object[e.start]):04X}"
    except (ValueError, RecursionError):  # a cycle or depth only a Python caller can build: not a surrogate
        return None
    return None


def check_query(value: Any, max_chars: int = MAX_QUERY_CHARS) -> tuple[str | None, str | None]:
    """(normalised query, None) or (None, reason).

    >>> check_query("  Cheap\\u00a0THAI  near me ")
    ('cheap thai near me', None)
    >>> check_query("   ")
    (None, 'empty query')
    >>> check_query(42)
    (None, 'not text: int')
    """
    if value is None:
        return None, "missing query"
    if not isinstance(value, str):
        return None, f"not text: {type(value).__name__}"
    bad = lone_surrogate(value)
    if bad:
        return None, bad
    norm = normalize_text(value)
    if not norm:
        return None, "empty query"
    if len(norm) > max_chars:
        return None, f"longer than {max_chars} characters ({len(norm)})"
    if any(ord(c) < 32 for c in norm):
        return None, "control characters"
    return norm, None
