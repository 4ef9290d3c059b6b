"""Sentence boundaries on real answers: decimals, abbreviations, list markers, ? and !, continuations."""

from __future__ import annotations

import pytest

from mmalign.sampling.sentences import closes_sentence, first_sentence, split_sentences


@pytest.mark.parametrize("text, sentences", [
    ("The bar is 3.5 cm long. It is red.", ["The bar is 3.5 cm long.", "It is red."]),
    ("Fruit, e.g. apples, i.e. red ones. Dr. Smith agrees.",
     ["Fruit, e.g. apples, i.e. red ones.", "Dr. Smith agrees."]),
    ("It is in the U.S. and big. Mrs. Lee said so.", ["It is in the U.S. and big.", "Mrs. Lee said so."]),
    ("Cats, dogs, etc. are here. Birds, etc. Then fish.", ["Cats, dogs, etc. are here.", "Birds, etc.", "Then fish."]),
    ("Is it red? Yes! It is.", ["Is it red?", "Yes!", "It is."]),
    ("Steps:\n1. Cut the bread.\n2. Toast it.", ["Steps:\n1. Cut the bread.", "2. Toast it."]),
    ("1. A cat. 2. A dog.", ["1. A cat.", "2. A dog."]),
    ("There are 3. Then more.", ["There are 3.", "Then more."]),
    ('He said "stop." Then left.', ['He said "stop."', "Then left."]),
    ("Version 2.0 ships... Maybe.", ["Version 2.0 ships...", "Maybe."]),
])
def test_split_sentences(text, sentences):
    pieces = split_sentences(text)
    assert [s for s, _ in pieces] == sentences
    assert "".join(s + sep for s, sep in pieces) == text


def test_a_continuation_starts_mid_sentence():
    assert first_sentence(" 3. And then") == " 3."  # a count ending the sentence, not a list marker
    assert first_sentence(" about 3.5 cm. More") == " about 3.5 cm."
    assert first_sentence(" no end yet") == " no end yet"


def test_decoding_stops_only_at_a_certain_sentence_end():
    assert not closes_sentence(" costs 3.")      # may still become 3.5
    assert closes_sentence(" costs 3.5 now. T")
    assert not closes_sentence(" e.g. this")     # an abbreviation
    assert closes_sentence(" is it? Yes")
