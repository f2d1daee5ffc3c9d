"""lb.tts.text_split, sans-io: a long text cut into pieces for parallel synthesis.

The oracles here read the pieces back against the text: each piece must be
found, in order, right after the previous one with only whitespace between
(`locate`), which is "each piece is text[a:b].strip() for consecutive,
covering ranges"; and a cut with no whitespace at it splits a run of
non-space characters, allowed only after CJK punctuation or inside a word
longer than max_chars.
"""
from __future__ import annotations

import pytest
from hypothesis import given, settings, strategies as st

from lb.tts.text_split import should_split, split_text

CLOSERS = "\"'”’»)]}」』）】〕》〉"
CJK_MARKS = "。！？，；：、"


def locate(text: str, pieces: list[str]) -> list[tuple[int, int]]:
    """Where each piece sits in `text` (start, end), asserting that the pieces
    follow each other with only whitespace between and cover the text."""
    spans, pos = [], 0
    for piece in pieces:
        rest = text[pos:]
        stripped = rest.lstrip()
        assert stripped.startswith(piece), (piece, rest[:80])
        start = pos + len(rest) - len(stripped)
        spans.append((start, start + len(piece)))
        pos = start + len(piece)
    assert text[pos:].strip() == "", text[pos:][:80]
    return spans


def word_run(text: str, at: int) -> str:
    """The run of non-space characters that holds the boundary at `at`."""
    a, b = at, at
    while a > 0 and not text[a - 1].isspace():
        a -= 1
    while b < len(text) and not text[b].isspace():
        b += 1
    return text[a:b]


def mid_word_cuts(text: str, pieces: list[str], max_chars: int) -> list[int]:
    """Cuts that split a run of non-space characters without being allowed to:
    allowed only right after CJK punctuation (and closers), or inside a word
    longer than max_chars."""
    spans = locate(text, pieces)
    bad = []
    for (_, end), (start, _) in zip(spans, spans[1:]):
        if end != start:
            continue                      # whitespace at the cut: between words
        if text[:end].rstrip(CLOSERS)[-1:] in tuple(CJK_MARKS):
            continue
        if len(word_run(text, end)) > max_chars:
            continue
        bad.append(end)
    return bad


def check(text: str, pieces: list[str], max_chars: int) -> None:
    """What holds for every text: cover in order, within max_chars, no
    empty or unstripped pieces, no mid-word cut."""
    locate(text, pieces)
    assert all(piece and piece == piece.strip() for piece in pieces)
    assert all(len(piece) <= max_chars for piece in pieces), [len(p) for p in pieces]
    assert mid_word_cuts(text, pieces, max_chars) == []


# --- examples

def test_one_short_sentence_comes_back_stripped():
    assert split_text("  Hello there, world.  \n", max_chars=5000) == ["Hello there, world."]
    assert split_text("no period at all", max_chars=5000) == ["no period at all"]


def test_whitespace_only_gives_nothing():
    assert split_text("", max_chars=10) == []
    assert split_text(" \n\t \u3000", max_chars=10) == []


def test_english_paragraphs_first_sentence_then_packed():
    text = ("The storm came in at dusk. Boats were pulled ashore. Nobody slept.\n\n"
            "By morning the harbour was calm again! Was it over? The fishermen thought so.")
    pieces = split_text(text, max_chars=5000, target=60)
    assert pieces == ["The storm came in at dusk.",
                      "Boats were pulled ashore. Nobody slept.",
                      "By morning the harbour was calm again! Was it over?",
                      "The fishermen thought so."]
    check(text, pieces, 5000)


def test_a_line_break_ends_a_unit_even_without_a_period():
    text = "Chapter One\nIt was a bright cold day in April."
    assert split_text(text, max_chars=100, target=20) == [
        "Chapter One", "It was a bright cold day in April."]


def test_abbreviations_and_initials_do_not_end_a_sentence():
    text = ("Dr. Watson met Mr. Holmes and Mrs. Hudson on Baker St. at noon. "
            "They spoke of J. R. R. Tolkien, e.g. his maps, i.e. the good ones. "
            "Smith vs. Jones was next.")
    pieces = split_text(text, max_chars=5000, target=10)
    assert pieces == ["Dr. Watson met Mr. Holmes and Mrs. Hudson on Baker St. at noon.",
                      "They spoke of J. R. R. Tolkien, e.g. his maps, i.e. the good ones.",
                      "Smith vs. Jones was next."]


def test_decimal_numbers_are_not_cut():
    text = "Pi is about 3.14 and e is 2.718. Version 2.0. Costs 1,000.50 now."
    assert split_text(text, max_chars=5000, target=5) == [
        "Pi is about 3.14 and e is 2.718.", "Version 2.0.", "Costs 1,000.50 now."]


def test_closing_quotes_and_brackets_stay_with_their_sentence():
    text = 'He said "Stop." Then he left. (It was late.) She asked: \u201cWhy?\u201d Nobody knew.'
    assert split_text(text, max_chars=5000, target=5) == [
        'He said "Stop."', "Then he left.", "(It was late.)",
        "She asked: \u201cWhy?\u201d", "Nobody knew."]


def test_cjk_sentences_cut_without_spaces():
    text = "今天天气很好。我们去公园散步吧！你觉得怎么样？“好的。”他说。"
    pieces = split_text(text, max_chars=5000, target=10)
    assert pieces == ["今天天气很好。", "我们去公园散步吧！", "你觉得怎么样？", "“好的。”他说。"]
    check(text, pieces, 5000)


def test_long_cjk_sentence_is_cut_at_cjk_clause_marks():
    text = "春天来了，花开了，鸟儿在唱歌、孩子们在玩耍；大家都很高兴。"
    pieces = split_text(text, max_chars=12, first_max=8, target=12)
    # First piece: clauses up to first_max; the rest packed up to target.
    assert pieces == ["春天来了，", "花开了，鸟儿在唱歌、", "孩子们在玩耍；", "大家都很高兴。"]
    assert "".join(pieces) == text


def test_two_thousand_characters_of_twenty_sentences():
    nouns = ["the river", "a lantern", "the old mill", "our neighbours", "the station"]
    sentences = [f"On day {i} we walked past {nouns[i % 5]} and talked about "
                 f"{' and '.join(nouns[:1 + i % 4])} until the light went down."
                 for i in range(20)]
    text = " ".join(sentences)
    assert 1800 <= len(text) <= 2600 and all(len(s) <= 300 for s in sentences)
    pieces = split_text(text, max_chars=5000)          # first_max 200, target 300
    assert pieces[0] == sentences[0]
    assert all(len(p) <= 300 for p in pieces)
    # Each piece is whole consecutive sentences, in order, packed greedily.
    rebuilt = [s for p in pieces for s in sentences if s in p]
    assert rebuilt == sentences
    assert len(pieces) < 12
    for piece, nxt in zip(pieces[1:], pieces[2:]):
        assert len(piece + " " + nxt.split(".")[0] + ".") > 300
    check(text, pieces, 5000)


def test_long_first_sentence_gives_its_first_clauses_up_to_first_max():
    text = ("When the rain finally stopped, the children ran outside, shouting and "
            "laughing, and the dogs followed them into the muddy fields beyond the "
            "village. Then it rained again.")
    pieces = split_text(text, max_chars=5000, first_max=40)
    assert pieces[0] == "When the rain finally stopped,"
    assert pieces[1].startswith("the children ran outside,")
    check(text, pieces, 5000)


def test_long_first_clause_gives_words_up_to_first_max():
    text = "Seventeen quiet grey herons stood in the shallow water for hours. Next."
    pieces = split_text(text, max_chars=5000, first_max=25)
    assert pieces[0] == "Seventeen quiet grey"
    assert pieces[1:] == ["herons stood in the shallow water for hours. Next."]


def test_sentence_over_max_chars_is_cut_at_clauses_then_words():
    clauses = ["alpha beta gamma delta,", "epsilon zeta eta theta;",
               "iota kappa lambda mu nu xi omicron pi rho sigma tau upsilon."]
    text = "Short one. " + " ".join(clauses) + " Last one."
    pieces = split_text(text, max_chars=30, target=30)
    assert pieces == ["Short one.", "alpha beta gamma delta,", "epsilon zeta eta theta;",
                      "iota kappa lambda mu nu xi", "omicron pi rho sigma tau",
                      "upsilon.", "Last one."]
    check(text, pieces, 30)


def test_sentence_between_target_and_max_chars_stands_alone():
    long = "This sentence is rather longer than the target but fits the limit."
    text = f"Hi. Yes. {long} No. Ok."
    assert split_text(text, max_chars=100, target=20) == ["Hi.", "Yes.", long, "No. Ok."]


def test_words_are_never_cut_when_they_fit():
    words = [("w%d" % i) * (1 + i % 7) for i in range(120)]
    text = " ".join(words)
    pieces = split_text(text, max_chars=40, first_max=15, target=40)
    assert " ".join(pieces) == text
    assert [w for p in pieces for w in p.split()] == words
    assert len(pieces[0]) <= 15 and all(len(p) <= 40 for p in pieces)
    check(text, pieces, 40)


def test_only_a_word_longer_than_max_chars_is_cut_hard():
    text = "a " + "x" * 250 + " b"
    assert split_text(text, max_chars=100) == ["a", "x" * 100, "x" * 100, "x" * 50, "b"]
    # Longer than first_max but within max_chars: whole, not cut.
    word = "y" * 80
    assert split_text(word + " z.", max_chars=100, first_max=10) == [word, "z."]


def test_limits_default_and_cap_at_max_chars():
    sentences = [f"Sentence {i} has some words in it." for i in range(40)]
    text = " ".join(sentences)
    pieces = split_text(text, max_chars=5000)
    assert pieces[0] == sentences[0] and max(map(len, pieces)) <= 300
    assert max(map(len, split_text(text, max_chars=100, target=1000))) <= 100
    first = split_text("word " * 100, max_chars=50, first_max=1000)[0]
    assert 45 <= len(first) <= 50


@pytest.mark.parametrize("kwargs", [dict(max_chars=0), dict(max_chars=-3),
                                    dict(max_chars=10, first_max=0),
                                    dict(max_chars=10, target=0)])
def test_bad_limits_raise(kwargs):
    with pytest.raises(ValueError):
        split_text("Some text.", **kwargs)


def test_should_split():
    assert should_split("x" * 11, min_chars=10, max_chars=100)
    assert not should_split("x" * 10, min_chars=10, max_chars=100)
    assert should_split("x" * 11, min_chars=50, max_chars=10)
    assert not should_split("", min_chars=0, max_chars=10)


# --- properties

TOKENS = ["Dr. ", "e.g. ", "J. ", "3.14", "1,000", "vs. ", ". ", "! ", "? ", "… ", ".\" ",
          ", ", "; ", " — ", "。", "”", "，", "、", "你好", "\n", "\n\n", "x" * 30, "word ",
          "  ", "\t"]
ALPHABET = "abcXYZ .,;:!?…—–\"'”)(\n\t。！？，、你好3"
texts = st.lists(st.sampled_from(TOKENS) | st.text(ALPHABET, max_size=8), max_size=40).map("".join)
limits = st.none() | st.integers(1, 60)


@settings(max_examples=400)
@given(text=texts | st.text(ALPHABET, max_size=200), max_chars=st.integers(1, 40),
       first_max=limits, target=limits)
def test_property_any_text(text, max_chars, first_max, target):
    pieces = split_text(text, max_chars=max_chars, first_max=first_max, target=target)
    check(text, pieces, max_chars)
    assert (pieces == []) == (text.strip() == "")
    if pieces:
        cap = min(first_max or 200, max_chars)
        # Over first_max only when it is (part of) one over-long word.
        assert len(pieces[0]) <= cap or not any(c.isspace() for c in pieces[0])


words = st.text("abcdefghijklmnopqrstuvwxyz", min_size=3, max_size=10)
sentence = st.tuples(st.lists(words, min_size=1, max_size=8),
                     st.sampled_from([".", "!", "?", "…", ".\"", "?)", "!”"])).map(
    lambda t: " ".join(t[0]).capitalize() + t[1])
separators = st.sampled_from([" ", "  ", "\n", "\n\n", " \t "])


@st.composite
def sentence_texts(draw, min_size=1):
    sents = draw(st.lists(sentence, min_size=min_size, max_size=25))
    seps = [draw(separators) for _ in sents[1:]]
    text = draw(separators) + sents[0] + "".join(s + t for s, t in zip(seps, sents[1:]))
    return sents, text


@given(data=sentence_texts(), extra=st.integers(0, 200), first_extra=st.integers(0, 50))
def test_property_sentences_within_target_pack_greedily(data, extra, first_extra):
    sents, text = data
    target = max(map(len, sents)) + extra
    first_max = len(sents[0]) + first_extra
    pieces = split_text(text, max_chars=target + 50, first_max=first_max, target=target)
    check(text, pieces, target + 50)
    # Oracle: first sentence alone, then greedy runs of whole sentences.
    spans = locate(text, sents)
    expected, i = [sents[0]], 1
    while i < len(sents):
        j = i
        while j + 1 < len(sents) and spans[j + 1][1] - spans[i][0] <= target:
            j += 1
        expected.append(text[spans[i][0]:spans[j][1]])
        i = j + 1
    assert pieces == expected


@given(data=sentence_texts(min_size=2), max_chars=st.integers(10, 120),
       target=st.integers(10, 120), first_max=st.integers(1, 120))
def test_property_pieces_exceed_target_only_as_one_sentence(data, max_chars, target, first_max):
    sents, text = data
    pieces = split_text(text, max_chars=max_chars, first_max=first_max, target=target)
    check(text, pieces, max_chars)
    starts = {a for a, _ in locate(text, sents)}
    ends = {b for _, b in locate(text, sents)}
    second = locate(text, sents)[1][0]
    for piece, (a, b) in zip(pieces[1:], locate(text, pieces)[1:]):
        one_word = not any(c.isspace() for c in piece)
        if a < second:
            # The rest of a first sentence cut short: packed like a sentence of its own.
            assert len(piece) <= max_chars, piece
            continue
        assert len(piece) <= min(target, max_chars) or piece in sents or one_word, piece
        inner = [p for p in starts if a < p < b]
        if inner:                          # spans sentences: then whole ones only
            assert a in starts and b in ends, piece
