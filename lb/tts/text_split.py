"""Cut a long text into pieces that are synthesized in parallel and played in order.

Time to first audio is the time to synthesize the first piece, so the first
piece is kept short: the first sentence, or, if that is longer than
`first_max`, its first clauses (or words) up to `first_max`.  Later pieces
are whole sentences packed greedily up to `target` characters: fewer, longer
calls, each still within the backend's hard input limit `max_chars`.

Where a cut may fall, coarsest first:
  1. sentence ends: `. ! ? …` (optionally followed by closing quotes or
     brackets) then whitespace; the CJK forms `。！？` (and closers) with or
     without whitespace; and every line break (paragraphs, list items).
  2. clause ends: `, ; : — –` (and closers) then whitespace; CJK `，；：、`.
  3. whitespace between words.
  4. inside a "word" (a run of non-space characters, which is what a CJK run
     without punctuation is too): only when that word alone is longer than
     `max_chars`, and then hard, every `max_chars` characters.  No other
     cut splits a run of non-space characters, except right after the CJK
     punctuation of 1. and 2., which is not followed by a space in CJK text.
A finer kind is used only inside a unit of the coarser kind that is too long.

Kept simple on purpose: a period ends a sentence only when whitespace follows
it, so "3.14", "e.g.x" and "U.S.A" inside a token never cut; and a single
period after one of _ABBREVIATIONS (case-sensitive) or after a lone capital
initial ("J.") does not end a sentence, so "Dr. Smith" stays together (at
the cost of not cutting after "...vitamin C." or "...the Dr." either).

Every piece is `text[a:b].strip()` for consecutive, non-overlapping ranges
that cover the text, so the pieces joined differ from the text only in the
whitespace at the cuts.  No piece is empty, none is longer than `max_chars`.
"""

from __future__ import annotations

import re
from bisect import bisect_left, bisect_right

_CLOSERS = re.escape("\"'”’»)]}」』）】〕》〉")
_OPENERS = "\"'“‘«([{「『（【〔《〈"
# Each pattern ends in greedy whitespace, so a match's end is where the next
# piece starts (a non-space character, or the end of the text).  The
# lookbehinds start a match only at the first mark of a run ("...."), which
# keeps the scan linear.
_LATIN_END = re.compile(rf"(?<![.!?…])([.!?…]+)([{_CLOSERS}]*)\s+")
_CJK_END = re.compile(rf"(?<![。！？])[。！？]+[{_CLOSERS}]*\s*")
_LINE_BREAK = re.compile(r"[\n\r\u2028\u2029]\s*")
_LATIN_CLAUSE = re.compile(rf"(?<![,;:—–])[,;:—–]+[{_CLOSERS}]*\s+")
_CJK_CLAUSE = re.compile(r"(?<![，；：、])[，；：、]+\s*")
_SPACE = re.compile(r"\s+")

_ABBREVIATIONS = frozenset(
    "Mr. Mrs. Ms. Dr. Prof. St. Jr. Sr. Mt. vs. Vs. e.g. E.g. i.e. I.e. cf.".split())
_LONGEST_ABBREVIATION = 6          # characters before the period, with an opening quote
_INITIAL = re.compile(r"[A-Z]\.")

SENTENCE, CLAUSE, WORD, HARD = range(4)    # kinds of cut, coarsest first


def split_text(text: str, *, max_chars: int, first_max: int | None = None,
               target: int | None = None) -> list[str]:
    """The pieces of `text`, in order (see the module docstring).

    `max_chars` is a hard limit per piece; `first_max` (default
    min(max_chars, 200)) bounds the first piece, `target` (default
    min(max_chars, 300)) the packing of later ones; both are capped at
    `max_chars`.  A whitespace-only text gives [].
    """
    if max_chars < 1:
        raise ValueError(f"max_chars must be >= 1, got {max_chars}")
    first_max = _limit("first_max", first_max, 200, max_chars)
    target = _limit("target", target, 300, max_chars)
    if not text.strip():
        return []
    cuts = _cuts(text)
    sentences = [0, *cuts[SENTENCE], len(text)]
    end = sentences[1]
    if _size(text, 0, end) <= first_max:
        first = (0, end)
    else:
        first = _split(text, cuts, 0, end, CLAUSE, first_max, first_max, max_chars)[0]
    # The rest of a first sentence that was cut short is packed like a sentence.
    rest = ([first[1]] if first[1] < end else []) + sentences[1:]
    spans = [first, *_pack(text, cuts, rest, SENTENCE, target, max_chars, max_chars)]
    return [text[a:b].strip() for a, b in spans]


def should_split(text: str, *, min_chars: int, max_chars: int) -> bool:
    """Whether `text` is worth splitting (longer than `min_chars`) or must be
    (longer than the backend's `max_chars`)."""
    return len(text) > min_chars or len(text) > max_chars


def _limit(name: str, value: int | None, default: int, max_chars: int) -> int:
    if value is None:
        return min(max_chars, default)
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return min(value, max_chars)


def _size(text: str, a: int, b: int) -> int:
    """The length of the piece that the range [a, b) gives."""
    return len(text[a:b].strip())


def _cuts(text: str) -> tuple[list[int], list[int], list[int]]:
    """Sorted cut positions of each kind (SENTENCE, CLAUSE, WORD).  A cut
    position is the index where the next piece starts; only positions with
    text before and after them count, so no range is whitespace only."""
    sentence = [m.end() for m in _LATIN_END.finditer(text)
                if not (m.group(1) == "." and not m.group(2)
                        and _is_abbreviation(text, m.start(1)))]
    sentence += [m.end() for m in _CJK_END.finditer(text)]
    sentence += [m.end() for m in _LINE_BREAK.finditer(text)]
    clause = [m.end() for m in _LATIN_CLAUSE.finditer(text)]
    clause += [m.end() for m in _CJK_CLAUSE.finditer(text)]
    word = [m.end() for m in _SPACE.finditer(text)]
    lead, n = len(text) - len(text.lstrip()), len(text)

    def inside(positions: list[int]) -> list[int]:
        return sorted({p for p in positions if lead < p < n})
    return inside(sentence), inside(clause), inside(word)


def _is_abbreviation(text: str, dot: int) -> bool:
    """Whether the period at `dot` closes an abbreviation or an initial."""
    start = dot
    # Bounded walk back to the start of the token: no abbreviation is longer.
    while start > 0 and dot - start <= _LONGEST_ABBREVIATION and not text[start - 1].isspace():
        start -= 1
    if start > 0 and not text[start - 1].isspace():
        return False
    word = text[start:dot + 1].lstrip(_OPENERS)
    return word in _ABBREVIATIONS or _INITIAL.fullmatch(word) is not None


def _split(text: str, cuts: tuple[list[int], ...], a: int, b: int, level: int,
           soft: int, hard: int, max_chars: int) -> list[tuple[int, int]]:
    """Ranges covering [a, b), cut at cuts of kind `level` (or finer, where
    a unit is still longer than `hard`)."""
    if level == HARD:
        # A single word longer than what it must fit in: cut every max_chars
        # characters (a word that fits in max_chars comes out whole).
        chunk = text[a:b]
        start, stop = a + len(chunk) - len(chunk.lstrip()), a + len(chunk.rstrip())
        edges = [a, *range(start + max_chars, stop, max_chars), b]
        return list(zip(edges, edges[1:]))
    inner = cuts[level]
    edges = [a, *inner[bisect_right(inner, a):bisect_left(inner, b)], b]
    return _pack(text, cuts, edges, level, soft, hard, max_chars)


def _pack(text: str, cuts: tuple[list[int], ...], edges: list[int], level: int,
          soft: int, hard: int, max_chars: int) -> list[tuple[int, int]]:
    """Greedy packing of the units between consecutive `edges`: a piece takes
    the next unit while it stays within `soft`; a unit longer than `soft`
    stands alone if it is within `hard`, else it is cut at the next finer
    kind of cut."""
    spans: list[tuple[int, int]] = []
    start = None
    for u, v in zip(edges, edges[1:]):
        if _size(text, u, v) > hard:
            if start is not None:
                spans.append((start, u))
                start = None
            spans += _split(text, cuts, u, v, level + 1, soft, hard, max_chars)
        elif start is None:
            start = u
        elif _size(text, start, v) > soft:
            spans.append((start, u))
            start = u
    if start is not None:
        spans.append((start, edges[-1]))
    return spans
