"""Text files a user names on the command line (prompts, metrics JSON): read, or one-line error."""
from __future__ import annotations

from pathlib import Path

from mmdiff.errors import UsageError


def read_user_text(path: str | Path, what: str) -> str:
    """The UTF-8 text of ``path``; a missing file, a folder or other bytes is a :class:`UsageError`.

    ``what`` names the file in the message, e.g. ``"prompts file"``.
    """
    file = Path(path).expanduser()
    if not file.exists():
        raise UsageError(f"{what} '{path}' does not exist.")
    if not file.is_file():
        raise UsageError(f"{what} '{path}' is not a file.")
    try:
        return file.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise UsageError(f"{what} '{path}' is not UTF-8 text (byte 0x{err.object[err.start]:02x} at "
                         f"offset {err.start}); save it as UTF-8.") from None


__all__ = ["read_user_text"]
