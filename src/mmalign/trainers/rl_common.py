"""Plumbing the RL recipes share (``trainers.rloo``: RLOO and GRPO; ``trainers.ppo``): config sections, the
step's rollouts, reward shaping, the minibatch update and the logged statistics. Free functions; each recipe's
``train_*`` loop reads top to bottom and calls them.

A step ``s`` takes the global batch ``batch_indices(n, batch_size, s - 1, seed)`` of prompts; each process
samples k answers for its share (``sampling.rollouts.sample_experience``), the recipe turns scores into
advantages (``objectives.policy_gradient``), and ``update`` runs ``update_epochs`` passes over the step's
rows in ``minibatches`` optimizer steps. A minibatch's loss is its mean over rows (or tokens, PPO) of all
processes, whatever the processes and micro-batches (each micro-batch's loss sum is scaled by processes x
grad_accum / the minibatch's global count). Generation is seeded by (run seed + process, step, prompts), so a
run resumed from the checkpoint of step s samples exactly the rollouts of step s + 1 an uninterrupted run
samples: resume needs no stored rollouts. The rollouts of every step are still written to
``<output_dir>/rollouts/step_<s>.jsonl`` (answers, raw scores, shaped rewards, advantages, oracle view).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from PIL import Image

from mmalign.config import ConfigError, to_dict
from mmalign.data.record_set import RecordSet
from mmalign.data.schema import PreferenceRecord
from mmalign.models.lora import prepare_policy
from mmalign.sampling.annotators import RolloutGroup
from mmalign.sampling.rewards import OracleMonitor, RewardConfig, RewardFn, alignment_scores
from mmalign.sampling.rollouts import RolloutConfig, sample_experience, write_step
from mmalign.trainers.checkpoints import resume_from
from mmalign.trainers.common import (
    PreferenceRecipeConfig, batch_indices, make_accelerator, process_slice, stop_if_not_finite, trainer_layout,
)
from mmalign.types import Experience, TokenRollouts

logger = logging.getLogger(__name__)

# Chunk loss: rows long[M] of the step -> (loss sum over those rows or their tokens, float[S] stat sums).
ChunkLoss = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


@dataclass
class RLDataConfig:
    """Prompt records (``.jsonl``/``.parquet``): their prompts and images are the RL prompts; their chosen and
    rejected answers serve only the reward statistics (``reward.normalize``). ``max_length``: the longest
    prompt + answer (image tokens included) a rollout may reach; it decides which layout ``forward: auto``
    picks (a sliding window shorter than that rules out the prefix cache)."""

    SHORTHAND: ClassVar[str] = "prompts"  # data=FILE sets data.prompts

    prompts: str = ""  # prompt records (.jsonl / .parquet); their answers only serve the reward statistics
    data_root: str | None = None  # folder image paths are relative to (None: the records file's folder)
    max_length: int = 2048  # longest prompt (image tokens included) + answer a rollout may reach

    def __post_init__(self) -> None:
        if self.max_length < 1:
            raise ValueError(f"data.max_length must be >= 1, got {self.max_length}")


@dataclass
class KLConfig:
    """The KL penalty to the reference (Apple Eq. 2): ``beta`` (Apple RLOO 0.4), the per-token estimator
    (``objectives.policy_gradient.KL_ESTIMATORS``: k1 = log pi - log pi_ref as TRL, or k3) and where it goes:
    ``reward`` (the sampled answer's KL is subtracted from its reward: TRL RLOO; PPO's per-token rewards) or
    ``loss`` (RLOO / GRPO: beta x the current policy's sequence KL is added to the loss, as the GRPO paper's
    objective, DeepSeekMath Eq. 3)."""

    beta: float = 0.4  # weight of the KL to the reference (Apple's RLOO: 0.4; 0: no KL, no reference pass)
    estimator: Literal["k1", "k3"] = "k1"  # per-token estimate: k1 = log pi - log pi_ref, k3 = e^-x + x - 1
    placement: Literal["reward", "loss"] = "reward"  # reward: TRL RLOO / PPO; loss: the GRPO paper

    def __post_init__(self) -> None:
        if not 0 <= self.beta < math.inf:  # "not (valid)": NaN is refused too
            raise ValueError(f"kl.beta must be a finite number >= 0, got {self.beta}")


@dataclass
class RLRecipeConfig(PreferenceRecipeConfig):
    """``PreferenceRecipeConfig`` (``batch_size`` in prompts per step, k answers each) plus the prompts, the
    rollouts, the reward, the KL, and the update: ``update_epochs`` passes over a step's rollouts, each in
    ``minibatches`` optimizer steps, with the ratio clipped to 1 +- ``clip``. ``forward``: auto, prefix_cache
    (each prompt once, its k answers against its KV cache) or plain."""

    data: RLDataConfig = field(default_factory=RLDataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    kl: KLConfig = field(default_factory=KLConfig)
    update_epochs: int = 1  # passes over each step's rollouts (PPO epochs; GRPO's mu)
    minibatches: int = 1  # optimizer steps per pass
    clip: float = 0.2  # the ratio is clipped to 1 +- clip

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.forward == "shared_prefix":
            raise ValueError("forward=shared_prefix is a preference-pair layout; RL runs auto, prefix_cache or plain")
        if self.update_epochs < 1 or self.minibatches < 1 or not 0 < self.clip < math.inf:
            raise ValueError(f"need update_epochs >= 1, minibatches >= 1 and a finite clip > 0; got "
                             f"{self.update_epochs}, {self.minibatches}, {self.clip}")


def rl_layout(cfg: RLRecipeConfig, policy: Any, accelerator: Accelerator) -> str:
    """The rollout layout: ``prefix_cache`` where exact for the model (``auto``), else ``plain``."""
    layout = trainer_layout(cfg.forward, policy, cfg.data.max_length, accelerator)
    return "plain" if layout == "shared_prefix" else layout


def check_batch(cfg: RLRecipeConfig, accelerator: Accelerator) -> int:
    """Rows per micro-batch on each process; refuses layouts that leave a micro-batch empty."""
    world = accelerator.num_processes
    rows = cfg.batch_size // world * cfg.rollout.k
    parts = cfg.minibatches * cfg.optim.grad_accum
    if cfg.batch_size % world or rows % parts:
        raise ConfigError(f"batch_size {cfg.batch_size} prompts x rollout.k {cfg.rollout.k} must split evenly over "
                          f"{world} process(es), then minibatches {cfg.minibatches} x grad_accum "
                          f"{cfg.optim.grad_accum}")
    return rows // parts


def start_rl(cfg: Any) -> tuple[Any, Accelerator, Any, Any, Any, Any]:
    """The start every RL recipe shares: accelerator, batch check (DeepSpeed told the micro-batch, as there is no
    dataloader to read it from), the LoRA policy with its frozen reference and projector, and the rollout layout.
    Returns (cfg with ``forward`` resolved, accelerator, policy, processor, frozen, projector)."""
    accelerator = make_accelerator(cfg.run, cfg.optim.grad_accum)
    micro = check_batch(cfg, accelerator)
    if accelerator.state.deepspeed_plugin is not None:
        accelerator.state.deepspeed_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = micro
    policy, processor, frozen, projector = prepare_policy(cfg)
    cfg = dataclasses.replace(cfg, forward=rl_layout(cfg, policy, accelerator))
    return cfg, accelerator, policy, processor, frozen, projector


def prompt_set(cfg: RLDataConfig) -> RecordSet:
    return RecordSet.at(cfg.prompts, cfg.data_root)


def load_prompts(cfg: RLDataConfig) -> list[PreferenceRecord]:
    records = prompt_set(cfg).read()
    if not records:
        raise ConfigError(f"{cfg.prompts}: no prompt records")
    return records


def reward_stats(cfg: RLRecipeConfig, reward: RewardFn, records: list[PreferenceRecord], accelerator: Accelerator,
                 out: Path) -> tuple[float, float] | None:
    """(mean, std) of the reward over the alignment set's own answers (Apple Sec. 5.5), computed once and kept
    in ``<out>/reward_stats.json`` (a resumed run reads it back); None without ``reward.normalize``."""
    if not cfg.reward.normalize:
        return None
    path = out / "reward_stats.json"
    if not path.is_file():
        mine = records[accelerator.process_index::accelerator.num_processes]
        scores = [s for part in gather_object([alignment_scores(reward, mine, prompt_set(cfg.data).images)])
                  for s in part]
        values = torch.tensor(scores, dtype=torch.float64)
        stats = {"mean": float(values.mean()), "std": float(values.std()), "n": len(scores)}
        if not stats["std"] > 0:
            raise ConfigError(f"reward.normalize: the reward of the {len(scores)} answers of {cfg.data.prompts} has "
                              "no spread; set reward.normalize=false or give the records rejected answers")
        if accelerator.is_main_process:
            out.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(stats, indent=2) + "\n")
        accelerator.wait_for_everyone()
    stats = json.loads(path.read_text())
    logger.info("reward statistics of the alignment set: mean %.4f, std %.4f (%d answers)", stats["mean"],
                stats["std"], stats["n"])
    return stats["mean"], stats["std"]


@dataclass
class StepRollouts:
    """This process's rollouts of one step and the prompts they answer (``experience.rollouts[g]`` answers
    ``records[g]``, with ``images[g]``)."""

    experience: Experience
    records: list[PreferenceRecord]
    images: list[list[Image.Image]]

    @property
    def tokens(self) -> TokenRollouts:
        return self.experience.tokens


def sampling_logps_needed(cfg: RLRecipeConfig) -> bool:
    """Whether the update needs the sampling policy's log-probs: for a KL in the reward, or for ratios after the
    policy has changed (several passes or minibatches); an on-policy update recomputes them."""
    return cfg.kl.placement == "reward" or cfg.update_epochs > 1 or cfg.minibatches > 1


def collect(cfg: RLRecipeConfig, accelerator: Accelerator, policy: Any, frozen: Any | None, processor: Any,
            records: list[PreferenceRecord], reward: RewardFn, step: int) -> StepRollouts:
    """Sample this process's share of step ``step`` from ``policy`` (unwrapped, adapter on, no gradients)."""
    indices = process_slice(batch_indices(len(records), cfg.batch_size, step - 1, cfg.run.seed), accelerator)
    mine = [records[i] for i in indices]
    images = [prompt_set(cfg.data).images(r) for r in mine]
    policy.eval()
    with accelerator.autocast():
        experience = sample_experience(policy, frozen, processor, mine, images, cfg.rollout, reward,
                                       seed=cfg.run.seed + accelerator.process_index, step=step, layout=cfg.forward,
                                       device=accelerator.device, policy_logps=sampling_logps_needed(cfg))
    policy.train()
    return StepRollouts(experience, mine, images)


def shaped_scores(cfg: RLRecipeConfig, tokens: TokenRollouts, stats: tuple[float, float] | None) -> torch.Tensor:
    """float[N]: the scores standardised with the alignment-set statistics, minus the length penalty."""
    scores = tokens.scores if stats is None else (tokens.scores - stats[0]) / stats[1]
    return scores - cfg.reward.length_penalty * tokens.answer_mask.sum(dim=-1)


def batch_inputs(step: StepRollouts, rows: torch.Tensor) -> tuple[list, list, list[list[int]], list[int]]:
    """(prompts, images, answer token ids, group of each answer) of ``rows``, prompts renumbered from 0."""
    tokens = step.tokens
    groups = tokens.group[rows].tolist()
    order = sorted(set(groups))
    local = {g: i for i, g in enumerate(order)}
    answers = [ids[mask].tolist() for ids, mask in zip(tokens.answer_ids[rows], tokens.answer_mask[rows])]
    return ([step.records[g].prompt for g in order], [step.images[g] for g in order], answers,
            [local[g] for g in groups])


def optimizer_step(cfg: RLRecipeConfig, accelerator: Accelerator, model: Any, optimizer: Any, scheduler: Any,
                   rows: torch.Tensor, chunk_loss: ChunkLoss, row_weight: torch.Tensor, step: int = 0
                   ) -> tuple[torch.Tensor, float]:
    """One optimizer step on ``rows``: the loss is sum(chunk losses) / the global sum of ``row_weight[rows]``
    (rows, or tokens for a token-mean). Returns the stat sums of this process and the gradient norm. A loss or
    gradient norm that is not finite stops the run before the update (``stop_if_not_finite``; ``step`` names
    the recipe step in the message)."""
    total = accelerator.reduce(row_weight[rows].sum().float(), "sum")
    scale = accelerator.num_processes * cfg.optim.grad_accum / total
    sums, grad_norm = None, torch.tensor(0.0)
    for part in rows.tensor_split(cfg.optim.grad_accum):
        with accelerator.accumulate(model):
            with accelerator.autocast():
                loss, stats = chunk_loss(part)
            accelerator.backward(loss * scale)
            if accelerator.sync_gradients and cfg.optim.max_grad_norm > 0:
                norm = accelerator.clip_grad_norm_(model.parameters(), cfg.optim.max_grad_norm)
                grad_norm = grad_norm if norm is None else norm
            if accelerator.sync_gradients:
                stop_if_not_finite(accelerator, step, {"loss": (stats if sums is None else sums + stats)[0],
                                                       "grad_norm": grad_norm})
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        sums = stats if sums is None else sums + stats
    scheduler.step()
    return sums, float(grad_norm)


def update(cfg: RLRecipeConfig, accelerator: Accelerator, model: Any, optimizer: Any, scheduler: Any, step: int,
           n_rows: int, chunk_loss: ChunkLoss, row_weight: torch.Tensor, names: tuple[str, ...]) -> dict[str, float]:
    """``update_epochs`` passes over the step's ``n_rows`` rows, each shuffled (seeded by run seed, step and
    pass) into ``minibatches`` optimizer steps; returns the chunk stats ``names`` as means over every row (or
    token) of every pass (sums / summed row weight) and the mean gradient norm of the optimizer steps."""
    sums, weights, norms = torch.zeros(len(names), device=accelerator.device), 0.0, []
    for epoch in range(cfg.update_epochs):
        generator = torch.Generator().manual_seed(cfg.run.seed * 1_000_003 + step * 1_009 + epoch)
        for rows in torch.randperm(n_rows, generator=generator).tensor_split(cfg.minibatches):
            rows = rows.to(accelerator.device)
            stats, norm = optimizer_step(cfg, accelerator, model, optimizer, scheduler, rows, chunk_loss, row_weight,
                                         step)
            sums += stats.detach()
            weights += float(row_weight[rows].sum())
            norms.append(norm)
    total = accelerator.reduce(torch.cat([sums, torch.tensor([weights], device=sums.device)]), "sum")
    return {name: float(v) / float(total[-1]) for name, v in zip(names, total[:-1])} | {
        "grad_norm": sum(norms) / len(norms)}


def rollout_metrics(accelerator: Accelerator, step: StepRollouts, shaped: torch.Tensor, kl: torch.Tensor | None,
                    monitor: OracleMonitor | None) -> tuple[dict[str, float], list[dict[str, list[float]]]]:
    """Means over the step's rollouts (all processes): raw score, shaped reward, sequence KL of the sampled
    answers (when the sampling policy's log-probs were kept), answer tokens, and with a monitor the lab oracle's
    score and, over caption rollouts, hallucinated / missed objects. Also returns the oracle's view of each of
    this process's rollouts (empty without a monitor)."""
    tokens = step.tokens
    kl_sum = torch.zeros(()) if kl is None else kl.sum()
    values = [tokens.scores.sum(), shaped.sum(), kl_sum, tokens.answer_mask.sum(), len(shaped)]
    oracle: list[dict[str, list[float]]] = []
    if monitor is not None:
        oracle = monitor([RolloutGroup(r, i, ro.answers) for r, i, ro in
                          zip(step.records, step.images, step.experience.rollouts)])
        captions = [o for o in oracle if "hallucinated" in o]
        values += [sum(sum(o["score"]) for o in oracle), sum(sum(o["hallucinated"]) for o in captions),
                   sum(sum(o["missed"]) for o in captions), sum(len(o["missed"]) for o in captions)]
    s = accelerator.reduce(torch.stack([torch.as_tensor(v, dtype=torch.float32, device=accelerator.device)
                                        for v in values]), "sum").tolist()
    out = {"reward/score": s[0] / s[4], "reward/shaped": s[1] / s[4], "answer_tokens": s[3] / s[4]}
    if kl is not None:
        out["kl"] = s[2] / s[4]
    if monitor is not None:
        out["oracle/score"] = s[5] / s[4]
        if s[8]:
            out |= {"oracle/hallucinated": s[6] / s[8], "oracle/missed": s[7] / s[8]}
    return out, oracle


def save_rollouts(accelerator: Accelerator, step: StepRollouts, shaped: torch.Tensor, advantages: torch.Tensor,
                  kl: torch.Tensor | None, oracle: list[dict[str, list[float]]], steps_dir: Path,
                  step_number: int) -> None:
    """Gather every process's rollouts with their shaped rewards, sequence advantages, KL and oracle view
    (``rollout_metrics``) into the step file."""
    k = len(step.experience.rollouts[0].answers)
    for g, rollout in enumerate(step.experience.rollouts):
        rows = slice(g * k, (g + 1) * k)
        rollout.rewards = shaped[rows].tolist()
        rollout.verdict["advantages"] = advantages[rows].tolist()
        if kl is not None:
            rollout.verdict["kl"] = kl[rows].tolist()
        if oracle:
            rollout.verdict["oracle"] = oracle[g]
    gathered = [r for part in gather_object([step.experience.rollouts]) for r in part]
    if accelerator.is_main_process:
        write_step(steps_dir, step_number, gathered)
    accelerator.wait_for_everyone()


def fingerprint(cfg: RLRecipeConfig, extra: dict[str, Any]) -> dict[str, Any]:
    """What the rollouts depend on besides the weights; a resume with other prompts or sampling is refused."""
    sampling = {"rollout": to_dict(cfg.rollout), "reward": to_dict(cfg.reward), "kl": to_dict(cfg.kl),
                "batch_size": cfg.batch_size, "seed": cfg.run.seed, **extra}
    return {"prompts": cfg.data.prompts, "file_sha256": prompt_set(cfg.data).sha256(),
            "sampling_sha256": hashlib.sha256(json.dumps(sampling, sort_keys=True).encode()).hexdigest()}


def resume_step(cfg: RLRecipeConfig, accelerator: Accelerator, scheduler: Any, fp: dict[str, Any]) -> int:
    """Restore the newest intact checkpoint when ``run.resume`` (``checkpoints.resume_from``: model, optimizer,
    RNG states, ``scheduler``); returns its step (0: start afresh)."""
    state = resume_from(accelerator, cfg.run.output_dir, scheduler) if cfg.run.resume else None
    if state is None:
        if cfg.run.resume:
            logger.info("resume: no usable checkpoint under %s, starting from step 0", cfg.run.output_dir)
        return 0
    if state["fingerprint"] != fp:
        raise ConfigError(f"resume: step {state['step']} was trained with other prompts or sampling "
                          f"({state['fingerprint']} vs {fp})")
    return int(state["step"])
