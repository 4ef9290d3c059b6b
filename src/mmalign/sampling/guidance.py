"""Reference guidance of BDHS (Amirloo et al. 2024, arXiv 2407.02477, Sec. 3.4.2, Eq. 7): sentences, pivots, yes/no swap.

The chosen answer y+ is split into sentences y^{k,+} (``sampling.sentences``: decimals, abbreviations and list
markers do not end a sentence; "?" and "!" do); each is cut at a random word boundary into
(y^{k,+}_1, y^{k,+}_2) and the policy rewrites y^{k,+}_2 under the masked image, conditioned on the
ground-truth previous sentences y^{<k,+} and y^{k,+}_1. Sentences that start with yes/no are flipped with
probability 0.5 first. Every random draw of a record comes from ``record_rng(seed, record_id, iteration)`` in a
fixed order (``plan_iteration``), so a record's output never depends on which other records share its batch,
process or run.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

import numpy as np

from mmalign.sampling.sentences import split_sentences

# The paper's regex ``^[\s]*(Yes|yes|No|no)`` plus a word boundary: without it "Nothing ..." or "Yesterday ..."
# would be "swapped" into non-words.
YES_NO = re.compile(r"^[\s]*(Yes|yes|No|no)\b")
_SWAP = {"Yes": "No", "yes": "no", "No": "Yes", "no": "yes"}
_WORD = re.compile(r"\S+")


def swap_yes_no(sentence: str) -> str:
    """Flip a leading Yes/yes/No/no (the paper's yes/no heuristic); other sentences are returned unchanged."""
    return YES_NO.sub(lambda m: m.group(0)[: m.start(1) - m.start(0)] + _SWAP[m.group(1)], sentence, count=1)


def record_rng(seed: int, record_id: str, iteration: int) -> np.random.Generator:
    """The random stream of one record at one BDHS iteration (1-based), a pure function of its arguments."""
    digest = hashlib.sha256(record_id.encode("utf-8")).digest()
    words = [int.from_bytes(digest[i : i + 4], "little") for i in range(0, 16, 4)]
    return np.random.default_rng([seed, iteration, *words])


@dataclass
class SentencePlan:
    """How one sentence is rewritten: keep ``prefix`` (y^{k,+}_1, maybe yes/no-swapped) and let the policy
    continue it after ``context`` (the ground-truth y^{<k,+}); ``generate`` False means the prefix is the
    whole (swapped) sentence. ``separator`` is the whitespace that followed the sentence in y+."""

    context: str
    prefix: str
    separator: str
    generate: bool
    swapped: bool
    seed: int


@dataclass
class IterationPlan:
    """All random choices of one record at one iteration.

    ``keep``: bool[n_image_tokens], image tokens left visible (Eq. 6); ``noise_seed``: seed of the diffusion
    noise (Eq. 9, used when noise is on); ``sentences``: one plan per sentence (empty when unguided);
    ``seed``: sampling seed of the unguided full response.
    """

    keep: np.ndarray
    noise_seed: int
    sentences: list[SentencePlan]
    seed: int


def cut_sentence(sentence: str, swapped: bool, rng: np.random.Generator) -> tuple[str, bool]:
    """Choose y^{k,+}_1 at a random word boundary; returns ``(prefix, generate)``.

    With n >= 2 words the prefix keeps a uniform 1..n-1 leading words (both parts non-empty, as in the
    paper's Fig. 2). A one-word sentence is kept whole when it was yes/no-swapped (the swap is the
    hallucination) and regenerated from scratch otherwise.
    """
    words = list(_WORD.finditer(sentence))
    if len(words) >= 2:
        cut = int(rng.integers(1, len(words)))
        return sentence[: words[cut - 1].end()], True
    return (sentence, False) if swapped else ("", True)


def plan_iteration(rng: np.random.Generator, reference: str, n_image_tokens: int, rho: float,
                   guided: bool, swap_p: float) -> IterationPlan:
    """Draw, in this order: the image mask (Eq. 6: token i visible iff u_i >= rho, u_i ~ U[0,1)), the
    noise seed, then per sentence the yes/no swap (u >= 1 - swap_p, drawn only for yes/no sentences), the
    pivot and the sampling seed; an unguided iteration draws one sampling seed instead of sentences.
    """
    keep = rng.random(n_image_tokens) >= rho
    noise_seed = int(rng.integers(2**63))
    plans: list[SentencePlan] = []
    if not guided:
        return IterationPlan(keep, noise_seed, plans, int(rng.integers(2**63)))
    context = ""
    for sentence, separator in split_sentences(reference):
        swapped = bool(YES_NO.match(sentence)) and bool(rng.random() >= 1.0 - swap_p)
        prefix, generate = cut_sentence(swap_yes_no(sentence) if swapped else sentence, swapped, rng)
        plans.append(SentencePlan(context, prefix, separator, generate, swapped, int(rng.integers(2**63))))
        context += sentence + separator  # ground-truth y^{<k,+}, never the rewritten text
    return IterationPlan(keep, noise_seed, plans, 0)
