"""ComfyUI's reading of a prompt's weights (its CLIPTextEncode, comfy/sd1_clip.py), for the ComfyUI emphasis mode.

ComfyUI's syntax is parentheses alone: ``(text)`` multiplies the weight by 1.1 at each level of nesting,
``(text:w)`` sets it to ``w`` (not multiplied by the enclosing weight), ``\\(`` and ``\\)`` are literal
parentheses; ``[text]`` is plain text (no de-emphasis), and so are ``BREAK`` and A1111's other syntax. A group
whose ``:w`` is no number keeps the 1.1 factor and its text, colon included. Unbalanced parentheses never fail
(`_groups`).

Its weights act on the encoding, not on a mean: ``z = z_empty + (z - z_empty) * w`` at each token, ``z_empty``
being the encoding of the empty prompt (``SDClipModel.encode_token_weights``; conditioning.py applies it).
"""

from __future__ import annotations

__all__ = ["comfy_weighted_runs"]

_ESCAPED_CLOSE = "\0\1"
_ESCAPED_OPEN = "\0\2"


def comfy_weighted_runs(prompt: str) -> list[tuple[str, float]]:
    """``(text, weight)`` runs of `prompt` as ComfyUI's ``token_weights`` reads it, escapes undone."""
    escaped = prompt.replace("\\)", _ESCAPED_CLOSE).replace("\\(", _ESCAPED_OPEN)
    return [(_unescaped(text), weight) for text, weight in _weighted(escaped, 1.0)]


def _unescaped(text: str) -> str:
    return text.replace(_ESCAPED_CLOSE, ")").replace(_ESCAPED_OPEN, "(")


def _groups(text: str) -> list[str]:
    """`text` cut into plain runs and top-level parenthesised groups, as ComfyUI's ``parse_parentheses``: a group
    keeps its parentheses; one left open runs to the end as plain text; a stray ``)`` lowers the depth below 0,
    so that the ``(`` after it opens no group until the depth is back at 0."""
    groups: list[str] = []
    current = ""
    depth = 0
    for char in text:
        if char == "(":
            if depth == 0:
                if current:
                    groups.append(current)
                current = "("
            else:
                current += char
            depth += 1
        elif char == ")":
            depth -= 1
            if depth == 0:
                groups.append(current + ")")
                current = ""
            else:
                current += char
        else:
            current += char
    if current:
        groups.append(current)
    return groups


def _weighted(text: str, weight: float) -> list[tuple[str, float]]:
    runs: list[tuple[str, float]] = []
    for group in _groups(text):
        if len(group) >= 2 and group[0] == "(" and group[-1] == ")":
            inner = group[1:-1]
            inner_weight = weight * 1.1
            colon = inner.rfind(":")
            if colon > 0:
                try:
                    inner_weight = float(inner[colon + 1:])
                    inner = inner[:colon]
                except ValueError:
                    pass
            runs += _weighted(inner, inner_weight)
        else:
            runs.append((group, weight))
    return runs
