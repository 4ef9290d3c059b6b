"""Reference guidance (Eq. 7): sentence split, yes/no swap, word pivots, per-record random draws (Eq. 6 mask)."""

from __future__ import annotations

import pytest

from mmalign.sampling.bdhs import BDHSConfig
from mmalign.sampling.guidance import plan_iteration, record_rng, split_sentences, swap_yes_no


@pytest.mark.parametrize("text, expected", [
    ("There is a red circle. Yes it is.", [("There is a red circle.", " "), ("Yes it is.", "")]),
    ("No period here", [("No period here", "")]),
    ("  Lead.  Two...\nThree. ", [("  Lead.", "  "), ("Two...", "\n"), ("Three.", " ")]),
])
def test_split_sentences_round_trips(text, expected):
    pieces = split_sentences(text)
    assert pieces == expected
    assert "".join(s + sep for s, sep in pieces) == text


@pytest.mark.parametrize("sentence, swapped", [
    ("Yes.", "No."), ("no, there is none.", "yes, there is none."), ("  No it is not.", "  Yes it is not."),
    ("yes", "no"), ("Nothing is there.", "Nothing is there."), ("There is no star.", "There is no star."),
])
def test_swap_yes_no(sentence, swapped):
    assert swap_yes_no(sentence) == swapped


def test_record_rng_depends_on_seed_id_and_iteration_only():
    draw = lambda *a: record_rng(*a).random(4).tolist()  # noqa: E731
    assert draw(0, "r1", 1) == draw(0, "r1", 1)
    assert len({tuple(draw(*a)) for a in [(0, "r1", 1), (1, "r1", 1), (0, "r2", 1), (0, "r1", 2)]}) == 4


def test_mask_keeps_each_image_token_with_probability_one_minus_rho():
    assert plan_iteration(record_rng(0, "a", 1), "x y.", 50, 0.0, True, 0.5).keep.all()
    assert not plan_iteration(record_rng(0, "a", 1), "x y.", 50, 1.0, True, 0.5).keep.any()
    keep = plan_iteration(record_rng(0, "a", 1), "x y.", 200_000, 0.99, True, 0.5).keep
    assert keep.mean() == pytest.approx(0.01, abs=0.001)  # 4 standard errors


def test_guided_plan_uses_ground_truth_context_and_word_pivots():
    reference = "There is a red circle and a blue square. Yes it is. No."
    sentences = [s for s, _ in split_sentences(reference)]
    swaps = 0
    for i in range(400):
        plan = plan_iteration(record_rng(3, f"r{i}", 1), reference, 4, 0.5, True, 0.5)
        assert [p.context for p in plan.sentences] == ["", sentences[0] + " ", sentences[0] + " " + sentences[1] + " "]
        first = plan.sentences[0]
        assert first.generate and sentences[0].startswith(first.prefix)
        n_words = len(first.prefix.split())
        assert 1 <= n_words <= 8 and not first.prefix.endswith(" ")
        assert (sentences[0] + " ")[len(first.prefix)] == " "  # cut at a word boundary
        second = plan.sentences[1]
        assert second.prefix.split()[0] == ("No" if second.swapped else "Yes")
        last = plan.sentences[2]  # one word: kept whole when swapped, regenerated otherwise
        assert (last.prefix, last.generate) == (("Yes.", False) if last.swapped else ("", True))
        swaps += second.swapped + last.swapped
    assert swaps / 800 == pytest.approx(0.5, abs=0.06)


def test_unguided_plan_has_no_sentences():
    plan = plan_iteration(record_rng(0, "a", 5), "There is a star.", 3, 0.99, False, 0.5)
    assert plan.sentences == [] and plan.keep.shape == (3,)


@pytest.mark.parametrize("field, value", [("rho", 1.5), ("noise_steps", 1000), ("n_iter", 0), ("swap_p", -0.1),
                                          ("temperature", -1.0), ("batch_size", 0)])
def test_config_rejects_bad_values(field, value):
    with pytest.raises(ValueError, match=field):
        BDHSConfig(**{field: value})


def test_config_defaults_are_the_papers():
    cfg = BDHSConfig()
    assert (cfg.rho, cfg.noise_steps, cfg.n_iter, cfg.similarity_threshold, cfg.swap_p) == (0.99, 0, 5, 0.97, 0.5)
