"""Text sdlab writes as UTF-8 (prompts, captions, names in its files and JSON answers): the check that it can.

Python reads each command-line or file-name byte that is not UTF-8 (a Latin-1 "é" from a script or a file) as
a lone surrogate, U+DC80 + the byte (`surrogateescape`), and JSON may escape one (``"caf\\udce9"``): no UTF-8
file can hold it, so such text is refused where it comes in, naming where it came from and the byte.
"""

from __future__ import annotations

__all__ = ["not_utf8"]


def not_utf8(text: str, what: str) -> str | None:
    """Why `text` (named `what` in the message) is not UTF-8 text, or None when it is."""
    if text.isascii():          # a flag check: ASCII is UTF-8, and long base64 images skip the encoding
        return None
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        return (f"{what} is not UTF-8 text: {_undecoded(text[err.start])} at character {err.start + 1}; "
                f"convert it to UTF-8 first (e.g. iconv -f latin1 -t utf-8)")
    return None


def _undecoded(character: str) -> str:
    """The byte a lone surrogate stands for (`surrogateescape`), else the surrogate itself."""
    code = ord(character)
    return f"the byte 0x{code - 0xDC00:02X}" if 0xDC80 <= code <= 0xDCFF else f"the character U+{code:04X}"
