"""AUTOMATIC1111 prompt editing and alternation: the prompt text at each sampling step.

A1111 (``modules/prompt_parser.py``, ``get_learned_conditioning_prompt_schedules``) reads, before emphasis:

- ``[from:to:when]`` is ``from`` up to step ``when`` and ``to`` after it; ``[to:when]`` adds ``to`` after
  ``when``; ``[from::when]`` removes ``from`` after ``when``. The parts may hold emphasis, other edits and
  alternations (``a[b:[c:d:2]:1]e``); spaces are allowed around ``when``;
- ``[a|b|c]`` is ``a`` at step 1, ``b`` at step 2, ``c`` at step 3, ``a`` again at step 4... (an empty
  option is no text: ``[fe|]male``);
- ``when`` with a decimal point is a fraction of the steps (``0.25``), without one a step number (``5``);
  ``when = min(steps, int(value))``, and the prompt ``[from:to:when]`` holds ``from`` while the step
  counter is at most ``when``.

The schedule is a list ``[(end_at_step, text), ...]``: ``text`` is the prompt at steps up to and including
``end_at_step``; the last entry ends at ``steps``. Each text is then an ordinary prompt (emphasis, BREAK,
chunks). The sampler's guided denoiser counts its calls from 0 and uses the first entry whose
``end_at_step`` is at least the count (A1111 ``CFGDenoiser.step`` with ``reconstruct_cond_batch``; past the
last entry it falls back to the first, as A1111 does). A1111 schedules second-order samplers (Heun, DPM2,
DPM2 a, DPM++ 2S a, DPM++ SDE) over twice the steps, since they call the model about twice a step
(``SamplerData.total_steps``); sdlab's sampler table says how many calls each step makes
(``SamplerSpec.calls_per_step``).

A hires pass (``hires_steps``) counts on from the first pass: a step number ``when`` means step
``when - steps`` of the second pass, a fraction means ``(when - 1) * hires_steps`` (so ``1.5`` is its
middle), and everything before is already done (``[a:b:0.5]`` is ``b`` throughout).

A1111 before 1.6 had another rule, kept behind its option "Old prompt editing timelines"
(``use_old_scheduling``, ``old=True`` here): ``when`` below 1 is a fraction of the steps and any other
``when`` a step number, decimal point or not (``[a:b:1.0]`` switches after step 1, ``[a:b:2.5]`` after step
2), and a hires pass runs on the first pass's schedule, counting its steps from 0 again.

The grammar is A1111's (a lark grammar), parsed here by hand with the same results:

    start:       (prompt | stray "[" "]" "(" ")" ":")*
    prompt:      (emphasized | scheduled | alternate | plain)*
    emphasized:  "(" prompt ")" | "(" prompt ":" prompt ")" | "[" prompt "]"       (kept as text)
    scheduled:   "[" [prompt ":"] prompt ":" [space] NUMBER [space] "]"
    alternate:   "[" prompt ("|" [prompt])+ "]"
    plain:       any character but \\ [ ] ( ) : |, or \\ and the next character

A bracket that opens no complete element is text at the top level (``a [unbalanced``); inside an element
it ends the element's parse. A prompt that does not parse at all (a ``|`` outside brackets, a ``\\`` at the
end) has no schedule: it is used as written, as in A1111.

Before any of this A1111 splits the prompt for composable diffusion (``get_multicond_prompt_list``):
``composable_parts`` cuts it at every whole-word ``AND`` and reads a trailing ``:WEIGHT`` off each part
(1 when there is none, also without any ``AND``: ``a cat :1.5`` is the part ``a cat`` at weight 1.5).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Union

from sdlab.pipeline.prompt_syntax import MAX_BRACKET_DEPTH

__all__ = ["PromptSchedule", "composable_parts", "old_rule_differs", "prompt_schedule"]

PromptSchedule = list[tuple[int, str]]

_NUMBER = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?")   # lark's SIGNED_NUMBER
_SPACE = re.compile(r"\s+")
_PLAIN = re.compile(r"[^\\\[\]():|]+")


@dataclass(frozen=True, eq=False)
class _Scheduled:
    before: list[_Item]
    after: list[_Item]
    when: str                                      # the number as written: a "." makes it a fraction


@dataclass(frozen=True, eq=False)
class _Alternate:
    options: list[list[_Item]]


_Item = Union[str, _Scheduled, _Alternate]


class _Unparsable(Exception):
    """The prompt is no sentence of the grammar (A1111's LarkError): it is used as written."""


class _Parser:
    def __init__(self, text: str):
        self.text = text
        self._prompts: dict[int, tuple[list[_Item], int]] = {}    # `prompt(i)` depends on i only: parsed once

    def top(self) -> list[_Item]:
        items: list[_Item] = []
        i, n = 0, len(self.text)
        while i < n:
            part, i = self.prompt(i)
            items += part
            if i < n:
                if self.text[i] not in "[]():":
                    raise _Unparsable                  # "|" outside brackets, or a "\" at the very end
                items.append(self.text[i])             # a bracket that opens or closes nothing: text
                i += 1
        return items

    def prompt(self, i: int) -> tuple[list[_Item], int]:
        """The longest prompt from ``i``: (its items, where it stops)."""
        if i not in self._prompts:
            self._prompts[i] = self._prompt(i)
        return self._prompts[i]

    def _prompt(self, i: int) -> tuple[list[_Item], int]:
        text, items = self.text, []
        while i < len(text):
            c = text[i]
            if c in "[(":
                element = self.element(i)
                if element is None:
                    break
                part, i = element
                items += part
            elif c == "\\":
                if i + 1 >= len(text) or text[i + 1] == "\n":   # lark's "\\." : "." matches no newline
                    break
                items.append(text[i : i + 2])
                i += 2
            elif c in "]):|":
                break
            else:
                match = _PLAIN.match(text, i)
                items.append(match.group(0))
                i = match.end()
        return items, i

    def element(self, i: int) -> tuple[list[_Item], int] | None:
        """The bracketed element at ``i`` ("(" or "["), or None when none closes."""
        text = self.text
        first, j = self.prompt(i + 1)
        c = text[j] if j < len(text) else ""
        if text[i] == "(":
            if c == ")":
                return ["(", *first, ")"], j + 1
            if c == ":":
                second, k = self.prompt(j + 1)
                if k < len(text) and text[k] == ")":
                    return ["(", *first, ":", *second, ")"], k + 1
            return None
        if c == "]":
            return ["[", *first, "]"], j + 1
        if c == "|":
            options = [first]
            while j < len(text) and text[j] == "|":
                option, j = self.prompt(j + 1)
                options.append(option)
            if j < len(text) and text[j] == "]":
                return [_Alternate(options)], j + 1
            return None
        if c == ":":
            closed = self.when_closes(j + 1)
            if closed is not None:                     # [to:when]
                return [_Scheduled([], first, closed[0])], closed[1]
            second, k = self.prompt(j + 1)
            if k < len(text) and text[k] == ":":
                closed = self.when_closes(k + 1)
                if closed is not None:                 # [from:to:when]
                    return [_Scheduled(first, second, closed[0])], closed[1]
        return None

    def when_closes(self, i: int) -> tuple[str, int] | None:
        """``[space] NUMBER [space] "]"`` at ``i``: (the number, the index after "]"), else None."""
        space = _SPACE.match(self.text, i)
        i = space.end() if space else i
        number = _NUMBER.match(self.text, i)
        if number is None:
            return None
        i = number.end()
        space = _SPACE.match(self.text, i)
        i = space.end() if space else i
        if i < len(self.text) and self.text[i] == "]":
            return number.group(0), i + 1
        return None


def _bracket_depth(text: str) -> int:
    """The most brackets open at once (escaped ones not counted)."""
    depth = deepest = 0
    escaped = False
    for c in text:
        if escaped:
            escaped = False
        elif c == "\\":
            escaped = True
        elif c in "([":
            depth += 1
            deepest = max(deepest, depth)
        elif c in ")]":
            depth = max(depth - 1, 0)
    return deepest


def _walk(items: list[_Item]):
    for item in items:
        if isinstance(item, _Scheduled):
            yield item
            yield from _walk(item.before)
            yield from _walk(item.after)
        elif isinstance(item, _Alternate):
            yield item
            for option in item.options:
                yield from _walk(option)


def prompt_schedule(prompt: str, steps: int, hires_steps: int | None = None, *, old: bool = False) -> PromptSchedule:
    """A1111's schedule of ``prompt`` over ``steps`` (see the module docstring): ``[(end_at_step, text), ...]``.

    With ``hires_steps`` it is the schedule of a hires second pass of that many steps after a first pass of
    ``steps``. ``old``: A1111's rule before 1.6 (its ``use_old_scheduling``), under which a hires pass runs on
    the first pass's schedule.

    >>> prompt_schedule("a [b:c:0.5] d", 10)
    [(5, 'a b d'), (10, 'a c d')]
    """
    first_pass = hires_steps is None or old
    int_offset, fraction_offset, total = (0, 0.0, steps) if first_pass else (steps, 1.0, hires_steps)
    if _bracket_depth(prompt) > MAX_BRACKET_DEPTH:    # the emphasis parser refuses it (PromptError)
        return [(total, prompt)]
    try:
        items = _Parser(prompt).top()
    except _Unparsable:
        return [(total, prompt)]

    when: dict[int, int] = {}
    ends = {total}
    for node in _walk(items):
        if isinstance(node, _Alternate):
            ends.update(range(1, total + 1))
            continue
        value = float(node.when)
        if old:
            value = value * total if value < 1 else value
        else:
            value = (value - fraction_offset) * total if "." in node.when else value - int_offset
        step = total if value >= total else (int(value) if math.isfinite(value) else -1)
        when[id(node)] = step
        if step >= 1:
            ends.add(step)

    def text_at(items: list[_Item], step: int) -> str:
        out = []
        for item in items:
            if isinstance(item, str):
                out.append(item)
            elif isinstance(item, _Scheduled):
                out.append(text_at(item.before if step <= when[id(item)] else item.after, step))
            else:
                out.append(text_at(item.options[(step - 1) % len(item.options)], step))
        return "".join(out)

    return [(end, text_at(items, end)) for end in sorted(ends)]


def old_rule_differs(prompts: list[str], steps: int, hires_steps: int | None = None) -> bool:
    """Whether A1111's old prompt-editing rule gives any of ``prompts`` another schedule than the new one: where
    A1111 with ``use_old_scheduling`` writes ``Old prompt editing timelines: True`` (``get_conds_with_caching``)."""
    return any(prompt_schedule(prompt, steps, hires_steps, old=True) != prompt_schedule(prompt, steps, hires_steps)
               for prompt in prompts)


_AND = re.compile(r"\bAND\b")
_PART_WEIGHT = re.compile(r"^((?:\s|.)*?)(?:\s*:\s*([-+]?(?:\d+\.?|\d*\.\d+)))?\s*$")


def composable_parts(prompt: str) -> list[tuple[str, float]]:
    """A1111's composable-diffusion parts of ``prompt``: ``[(text, weight), ...]`` (module docstring;
    ``prompt_parser.re_AND`` and ``re_weight``). Each part's trailing whitespace is dropped, with or
    without a weight, as ``re_weight`` drops it.

    >>> composable_parts("a cat AND a dog :0.5")
    [('a cat', 1.0), (' a dog', 0.5)]
    """
    parts = []
    for part in _AND.split(prompt):
        text, weight = _PART_WEIGHT.search(part).groups()     # the pattern matches any text
        parts.append((text, 1.0 if weight is None else float(weight)))
    return parts
