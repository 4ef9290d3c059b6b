"""Rollouts: k sampled answers per prompt from the current policy (Online-DPO, Apple arXiv 2407.02477 Sec. 2.3;
RLOO / GRPO / PPO, Sec. 5.5), and the on-disk store of each step's rollouts.

The k copies of a prompt are generated in the same batched ``generate`` call, so one seed fixes all of them.
The paper does not give k, the temperature or the token budget for Online-DPO (methods.md, Eq. 4 [U]); the
defaults are RLOO's k = 4 at T = 1.0. ``sample_rollouts`` gives the answers as text (the preference recipes,
``sampling.pairs``); ``sample_experience`` gives the RL ``Experience``: the sampled token ids, their log-probs
under the sampling policy and the reference, and the reward of every answer.

Step store: an online trainer pays for generation and annotation once per step. The rollouts of step s are
written to ``<dir>/step_<s>.jsonl`` (one ``Rollout`` per line) before the update; a resumed preference run
reads them back instead of sampling and annotating again, and an RL run keeps them as the audit trail of
every reward it trained on.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from mmalign.data.collate import right_pad
from mmalign.data.schema import PreferenceRecord, check_fields
from mmalign.models.lora import reference_model
from mmalign.models.rollout_forward import rollout_logps
from mmalign.sampling.annotators import RolloutGroup
from mmalign.sampling.generate import GenerationParams, generate, generate_ids
from mmalign.sampling.rewards import RewardFn
from mmalign.types import Experience, Rollout, TokenRollouts

logger = logging.getLogger(__name__)


@dataclass
class RolloutConfig:
    """k answers per prompt, sampled at ``temperature`` / ``top_p`` with at most ``max_new_tokens`` tokens.

    ``batch_size``: sequences per ``generate`` call and per log-prob pass (does not change which settings are used).
    """

    k: int = 4  # answers sampled per prompt
    temperature: float = 1.0  # sampling temperature (0: greedy)
    top_p: float = 1.0  # nucleus sampling threshold
    max_new_tokens: int = 64  # most tokens per answer
    batch_size: int = 32  # sequences per generate call (speed only)

    def __post_init__(self) -> None:
        if self.k < 2:
            raise ValueError(f"rollout.k must be >= 2 (a pair needs two answers), got {self.k}")
        if self.temperature <= 0:
            raise ValueError(f"rollout.temperature must be > 0 (greedy answers are all the same), "
                             f"got {self.temperature}")
        self.params()  # validates the rest

    def params(self) -> GenerationParams:
        return GenerationParams(max_new_tokens=self.max_new_tokens, temperature=self.temperature, top_p=self.top_p)


def rollout_seed(seed: int, step: int, record_ids: Sequence[str]) -> int:
    """A 63-bit generation seed from the run seed, the step and the prompts of the call."""
    blob = f"{seed}:{step}:" + "\x1f".join(record_ids)
    return int.from_bytes(hashlib.sha256(blob.encode()).digest()[:8], "big") >> 1


def _repeat(records: Sequence[PreferenceRecord], images: Sequence[list[Image.Image]], k: int) -> tuple[list, list]:
    if len(records) != len(images):
        raise ValueError(f"{len(records)} records but {len(images)} image lists")
    return [r.prompt for r in records for _ in range(k)], [imgs for imgs in images for _ in range(k)]


def sample_rollouts(model: Any, processor: Any, records: Sequence[PreferenceRecord],
                    images: Sequence[list[Image.Image]], cfg: RolloutConfig, seed: int) -> list[list[str]]:
    """k answers for each record's prompt; returns ``answers[i]`` = the k answers of ``records[i]``.

    Generation runs under ``torch.no_grad`` (inside ``generate``) with whatever adapters ``model`` has
    enabled, i.e. from the current policy. The same (model, inputs, cfg, seed) give the same answers.
    """
    prompts, row_images = _repeat(records, images, cfg.k)
    flat = generate(model, processor, prompts, row_images, cfg.params(), seed=seed, batch_size=cfg.batch_size)
    answers = [flat[i * cfg.k:(i + 1) * cfg.k] for i in range(len(records))]
    distinct = sum(len(set(a)) for a in answers) / max(len(answers), 1)
    logger.debug("rollouts: %d prompts x %d, %.2f distinct answers per prompt", len(records), cfg.k, distinct)
    return answers


def _token_logps(model: Any, processor: Any, records: Sequence[PreferenceRecord], images: Sequence[list],
                 answers: list[list[int]], cfg: RolloutConfig, layout: str, device: Any) -> torch.Tensor:
    """float[N, A]: log-probs of the N = G * k sampled answers under ``model``, ``cfg.batch_size`` rows a pass."""
    per_pass = max(1, cfg.batch_size // cfg.k)
    width = max(len(a) for a in answers)
    chunks = []
    for start in range(0, len(records), per_pass):
        stop = min(start + per_pass, len(records))
        rows = answers[start * cfg.k:stop * cfg.k]
        group = [g for g in range(stop - start) for _ in range(cfg.k)]
        logps, _ = rollout_logps(model, processor, [r.prompt for r in records[start:stop]], images[start:stop],
                                 rows, group, layout, device)
        chunks.append(torch.nn.functional.pad(logps, (0, width - logps.shape[1])))
    return torch.cat(chunks)


def sample_experience(policy: Any, frozen: Any | None, processor: Any, records: Sequence[PreferenceRecord],
                      images: Sequence[list[Image.Image]], cfg: RolloutConfig, reward: RewardFn, *, seed: int,
                      step: int, layout: str, device: Any, policy_logps: bool = True) -> Experience:
    """One RL step's rollouts: k sampled answers per record, scored by ``reward``, with the log-probs of each
    sampled token under the sampling policy and the reference (no gradients).

    ``policy``: the unwrapped policy (adapter on); ``frozen``: the reference copy, or None under LoRA (the
    policy with its adapter off, ``models.lora.reference_model``); ``layout``: a ``ROLLOUT_LAYOUTS`` name;
    ``policy_logps=False`` skips the sampling policy's pass (an on-policy update recomputes them).
    Rollout g's answers are rows g * k .. g * k + k - 1 of ``Experience.tokens``.
    """
    call_seed = rollout_seed(seed, step, [r.id for r in records])
    clock = [time.perf_counter()]
    ids = generate_ids(policy, processor, [r.prompt for r in records], list(images), cfg.params(), seed=call_seed,
                       batch_size=cfg.batch_size, copies=cfg.k)
    texts = [t.strip() for t in processor.tokenizer.batch_decode(ids, skip_special_tokens=True)]
    groups = [RolloutGroup(r, imgs, texts[g * cfg.k:(g + 1) * cfg.k], salt=f"step{step}")
              for g, (r, imgs) in enumerate(zip(records, images))]
    clock.append(time.perf_counter())
    scores = reward(groups)
    clock.append(time.perf_counter())
    with torch.no_grad():
        policy_lp = _token_logps(policy, processor, records, images, ids, cfg, layout, device) if policy_logps else None
        with reference_model(policy, frozen) as ref:
            ref_logps = _token_logps(ref, processor, records, images, ids, cfg, layout, device)
    clock.append(time.perf_counter())
    rows = [torch.tensor(a) for a in ids]
    width = max(len(a) for a in ids)
    tokens = TokenRollouts(
        group=torch.arange(len(records)).repeat_interleave(cfg.k).to(device),
        answer_ids=right_pad(rows, width, processor.tokenizer.pad_token_id).to(device),
        answer_mask=right_pad([torch.ones_like(r) for r in rows], width, 0).bool().to(device),
        ref_token_logps=ref_logps.float(), scores=torch.tensor([s for row in scores for s in row], device=device),
        policy_token_logps=None if policy_lp is None else policy_lp.float(),
    )
    rollouts = [Rollout(r.id, "rl", g.answers, verdict={"scores": s}) for r, g, s in zip(records, groups, scores)]
    seconds = {name: b - a for name, a, b in zip(("generate", "score", "logps"), clock, clock[1:])}
    return Experience(rollouts, tokens, seconds)


# --- the step store ----------------------------------------------------------------------------------------


def step_file(step_dir: str | Path, step: int) -> Path:
    return Path(step_dir) / f"step_{step:08d}.jsonl"


def write_step(step_dir: str | Path, step: int, rollouts: list[Rollout]) -> Path:
    """Write one step's rollouts atomically (a kill mid-write leaves no partial step file)."""
    path = step_file(step_dir, step)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text("".join(json.dumps(r.to_json(), ensure_ascii=False) + "\n" for r in rollouts))
    os.replace(tmp, path)
    return path


def read_step(step_dir: str | Path, step: int) -> list[dict[str, Any]] | None:
    """The stored lines of ``step`` as JSON objects, or None when that step was never written."""
    path = step_file(step_dir, step)
    if not path.is_file():
        return None
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def read_experience(step_dir: str | Path, step: int) -> Experience | None:
    """The stored rollouts of ``step`` (text level), or None when that step was never written."""
    entries = read_step(step_dir, step)
    return None if entries is None else Experience([Rollout.from_json(e) for e in entries])


def rollout_pair(rollout: Rollout) -> PreferenceRecord | None:
    """The training pair of a rollout (None: the prompt gave no pair), checked like any record."""
    if rollout.pair is None:
        return None
    images = [base64.b64decode(ref["bytes"]) if isinstance(ref, dict) else ref for ref in rollout.pair["images"]]
    return check_fields(rollout.pair | {"images": images})


def takes_offline(seed: int, step: int, record_id: str, p: float) -> bool:
    """alpha ~ Bernoulli(p) of Mixed-DPO (Apple Eq. 4), drawn per example from (seed, step, record id)."""
    return random.Random(f"mix:{seed}:{step}:{record_id}").random() < p
