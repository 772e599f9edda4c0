"""Sample keys that are safe to turn into file or tar member names.

A key comes from a shard someone else wrote; keys may hold ``/`` (``folder/000123`` is a common
webdataset layout), but a key that is absolute or has a ``..`` part would name a file outside the
output folder once a writer (``mmdiff precompute``, an extractor) uses it as a path, so such keys
are refused wherever samples are read or written.
"""
from __future__ import annotations

from typing import Optional


def unsafe_key_reason(key: str) -> Optional[str]:
    """Why ``key`` cannot be used as a relative file name (None when it can)."""
    if not key:
        return "the sample key is empty"
    if "\x00" in key:
        return "the sample key holds a NUL character"
    normal = key.replace("\\", "/")
    if normal.startswith("/") or (len(normal) > 1 and normal[1] == ":"):
        return f"the sample key '{key[:80]}' is an absolute path"
    if ".." in normal.split("/"):
        return f"the sample key '{key[:80]}' climbs out of its folder with '..'"
    return None
