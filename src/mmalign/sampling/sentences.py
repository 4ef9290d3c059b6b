"""Sentence boundaries in real answers, for BDHS's reference split and its "decode to the first full stop" (Eq. 7).

A sentence ends at a run of terminators (``.``, ``?``, ``!``, optionally followed by closing quotes or brackets)
that is followed by whitespace or by the end of the text, except where the full stop belongs to a token:

- a decimal or version number never ends there ("3.5", "v1.2": no whitespace after the dot);
- a list marker ("1.", "12.", "2)") at the start of a sentence or a line opens it rather than ending one;
- titles ("Dr.", "Mr.", "Mrs.", "Ms.", "Prof.", "St.") and "e.g." / "i.e." never end a sentence;
- other abbreviations ("etc.", "vs.", "approx.", "U.S.", "a.m.", ...: a known short form, or letters joined by
  dots) end one only when the next word starts with a capital letter.

The rules are heuristics in the spirit of rule-based splitters (no model, no download); what they cannot know
("in the U.S. Army" vs "in the U.S. Then") errs towards longer sentences, which only makes a BDHS rewrite span
more text.
"""

from __future__ import annotations

import re

_TERMINATORS = re.compile(r"[.?!]+[\"')\]]*(?=\s|$)")
_TOKEN_START = re.compile(r"\S+$")
_LIST_MARKER = re.compile(r"\(?\d{1,3}[.)]$")
_DOTTED = re.compile(r"^[a-z](\.[a-z])+\.$")
_TITLES = frozenset({"dr.", "mr.", "mrs.", "ms.", "prof.", "st.", "e.g.", "i.e.", "cf.", "viz."})
_SOFT = frozenset({"etc.", "vs.", "approx.", "fig.", "figs.", "no.", "nos.", "al.", "inc.", "ltd.", "co.", "jr.",
                   "sr.", "mt.", "ca.", "resp.", "esp."})


def _closes(text: str, start: int, end: int, sentence_start: int | None) -> bool:
    """Whether the terminator run ``text[start:end]`` ends the sentence that began at ``sentence_start`` (None:
    it began before ``text``)."""
    run = text[start:end].rstrip("\"')]")
    if "?" in run or "!" in run or len(run) > 1:
        return True
    token = _TOKEN_START.search(text, 0, end)
    word = token.group(0).rstrip("\"')]").lstrip("\"'([").lower() if token else ""
    line_start = text.rfind("\n", 0, token.start() if token else start) + 1
    opened = max(sentence_start, line_start) if sentence_start is not None else (line_start or None)
    if opened is not None and _LIST_MARKER.match(word) and not text[opened:token.start()].strip():
        return False  # "1." opening a list item (at a sentence or line start)
    if word in _TITLES:
        return False
    if word in _SOFT or _DOTTED.match(word):
        rest = text[end:].lstrip()
        return not rest or rest[0].isupper()
    return True


def sentence_ends(text: str, *, at_start: bool = True) -> list[int]:
    """Offsets just past each sentence's last terminator (closing quotes included), in order.

    ``at_start``: whether ``text`` begins a sentence (False for a continuation that starts mid-sentence, so a
    leading "3." is a number ending the sentence, not a list marker).
    """
    ends: list[int] = []
    sentence_start = 0 if at_start else None
    for match in _TERMINATORS.finditer(text):
        if _closes(text, match.start(), match.end(), sentence_start):
            ends.append(match.end())
            sentence_start = match.end()
    return ends


def split_sentences(text: str) -> list[tuple[str, str]]:
    """Split an answer into ``(sentence, separator)`` pairs; ``"".join(s + sep)`` gives ``text`` back.

    A sentence runs up to and including its terminators (``sentence_ends``); the whitespace after it is its
    separator. Leading whitespace stays in the first sentence; text after the last terminator is a sentence.
    """
    pieces: list[tuple[str, str]] = []
    pos = 0
    for end in [*sentence_ends(text), len(text)]:
        if end <= pos:
            continue
        sep_end = end
        while sep_end < len(text) and text[sep_end].isspace():
            sep_end += 1
        if text[pos:end].strip():
            pieces.append((text[pos:end], text[end:sep_end]))
        elif pieces:  # only whitespace left: it belongs to the previous separator
            pieces[-1] = (pieces[-1][0], pieces[-1][1] + text[pos:sep_end])
        pos = sep_end
    return pieces


def first_sentence(continuation: str) -> str:
    """A continuation cut after the sentence it finishes (it starts mid-sentence); whole if none ends in it."""
    ends = sentence_ends(continuation, at_start=False)
    return continuation[: ends[0]] if ends else continuation


def closes_sentence(continuation: str) -> bool:
    """Whether a continuation already holds a sentence end that is followed by more text (so decoding can stop:
    the end is certain, a trailing "3." could still become "3.5")."""
    return any(end < len(continuation) for end in sentence_ends(continuation, at_start=False))
