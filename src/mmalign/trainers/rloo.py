"""RLOO and GRPO on a VLM (Apple arXiv 2407.02477 Eq. 2, Sec. 5.5; Ahmadian et al. 2024; Shao et al. 2024).

One recipe: ``RLOOConfig`` + ``train_rloo(cfg)``; ``advantage`` picks the advantage function by name
(``objectives.policy_gradient.ADVANTAGES``: ``rloo`` leave-one-out, ``grpo`` group-normalised), the only
difference between the two. Each step (``trainers.rl_common``):

1. **rollouts**: k answers per prompt from the current policy (T = 1), scored by the reward (lab oracle,
   reward model or judge; ``sampling.rewards``), with their tokens' log-probs under the sampling policy and
   the reference;
2. **reward**: the score standardised with alignment-set statistics, minus ``reward.length_penalty`` per
   token, minus ``kl.beta`` x the sequence KL to the reference (k1 or k3 summed over the answer's tokens), as
   TRL's RLOO puts the KL in the reward (``kl.placement=reward``; with ``loss`` the KL term goes into the loss
   instead, as the GRPO paper, and an on-policy update needs no sampling-time policy pass);
3. **advantages** within each prompt's k answers;
4. **update**: ``update_epochs`` x ``minibatches`` optimizer steps on the clipped surrogate with
   sequence-level ratios ``exp(log pi(y) - log pi_old(y))`` (TRL RLOO); with one pass and one minibatch the
   ratio is 1 and this is REINFORCE with the baseline. The loss is the mean over the step's answers.

Apple's RLOO: LoRA, k = 4, T = 1, normalised reward, KL beta 0.4, gradient clip 1.0 (``configs/lab_rloo.yaml``,
``configs/lab_grpo.yaml``). Outputs as the preference trainers (``adapter/`` + ``merged/`` or ``model/``,
``metrics.jsonl``, checkpoints, ``config.yaml``) plus ``rollouts/step_<s>.jsonl`` and ``reward_stats.json``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from mmalign.config import ConfigError, save_config, to_dict
from mmalign.models.rollout_forward import rollout_logps
from mmalign.objectives.policy_gradient import ADVANTAGES, KL_ESTIMATORS, clipped_policy_loss, sequence_kl
from mmalign.progress import progress
from mmalign.runs import claim_folder
from mmalign.sampling.rewards import OracleMonitor, build_reward
from mmalign.trainers.checkpoints import adapter_only_checkpoints, lora_adapter_saver, step_checkpoint
from mmalign.trainers.common import (
    MetricsLogger, build_optimizer, build_scheduler, save_weights, steps_per_epoch,
)
from mmalign.trainers.rl_common import (
    RLRecipeConfig, StepRollouts, batch_inputs, collect, fingerprint, load_prompts, resume_step,
    reward_stats, rollout_metrics, save_rollouts, shaped_scores, start_rl, update,
)

logger = logging.getLogger(__name__)

_STATS = ("loss", "clip_fraction", "policy_kl")


@dataclass
class RLOOConfig(RLRecipeConfig):
    """``RLRecipeConfig`` plus ``advantage``: ``rloo`` (leave-one-out baseline) or ``grpo`` (group-normalised)."""

    advantage: Literal["rloo", "grpo"] = "rloo"  # rloo: leave-one-out baseline; grpo: group-normalised


def advantages(cfg: RLOOConfig, step: StepRollouts, stats: tuple[float, float] | None
               ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """(shaped reward float[N], the sampled answers' sequence KL float[N] or None when their sampling log-probs
    were not kept, advantages float[N]); with ``kl.placement=reward`` the shaped reward includes -beta x KL."""
    tokens = step.tokens
    shaped, kl = shaped_scores(cfg, tokens, stats), None
    if tokens.policy_token_logps is not None:
        token_kl = KL_ESTIMATORS[cfg.kl.estimator](tokens.policy_token_logps, tokens.ref_token_logps)
        kl = sequence_kl(token_kl, tokens.answer_mask)
    if cfg.kl.placement == "reward":
        shaped = shaped - cfg.kl.beta * kl
    return shaped, kl, ADVANTAGES[cfg.advantage](shaped.view(-1, cfg.rollout.k)).view(-1)


def chunk_loss(cfg: RLOOConfig, policy: Any, processor: Any, step: StepRollouts, adv: torch.Tensor,
               rows: torch.Tensor, device: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed loss of ``rows`` (clipped surrogate, + beta x the policy's sequence KL with ``kl.placement=loss``)
    and the sums of ``_STATS`` (float[3]). Without sampling log-probs the update is on-policy: old = current."""
    prompts, images, answers, group = batch_inputs(step, rows)
    token_logps, mask = rollout_logps(policy, processor, prompts, images, answers, group, cfg.forward, device)
    logps = (token_logps * mask).sum(dim=-1)
    sampled = step.tokens.policy_token_logps
    old = logps.detach() if sampled is None else (sampled[rows] * step.tokens.answer_mask[rows]).sum(dim=-1)
    losses, clipped = clipped_policy_loss(logps, old, adv[rows], cfg.clip)
    ref = step.tokens.ref_token_logps[rows][:, : mask.shape[1]]
    kl = sequence_kl(KL_ESTIMATORS[cfg.kl.estimator](token_logps, ref), mask)
    if cfg.kl.placement == "loss":
        losses = losses + cfg.kl.beta * kl
    return losses.sum(), torch.stack([losses.detach().sum(), clipped.float().sum(), kl.detach().sum()])


def train_rloo(cfg: RLOOConfig) -> Path:
    """Run RLOO or GRPO (``cfg.advantage``); returns the output directory.

    Like the other recipes: one run at a time per ``run.output_dir`` (``runs.claim_folder``); checkpoints every
    ``run.save_every`` steps and at the last one, each with a loadable ``adapter/`` under LoRA, and resumption
    from the newest intact one (``trainers.checkpoints``); a non-finite loss or gradient stops the run.
    """
    if not cfg.model.path or not cfg.data.prompts:
        raise ConfigError("model.path and data.prompts are required")
    with claim_folder(cfg.run.output_dir):
        return _train_rloo(cfg)


def _train_rloo(cfg: RLOOConfig) -> Path:
    out = Path(cfg.run.output_dir)
    cfg, accelerator, policy, processor, frozen, projector = start_rl(cfg)
    records = load_prompts(cfg.data)
    per_epoch = steps_per_epoch(len(records), cfg.batch_size)  # also refuses a batch larger than the data
    total = cfg.max_steps or cfg.epochs * per_epoch
    if frozen is not None:
        frozen.to(accelerator.device)
    optimizer = build_optimizer(policy, cfg.optim, projector)
    scheduler = build_scheduler(optimizer, cfg.optim, total * cfg.update_epochs * cfg.minibatches)
    policy, optimizer = accelerator.prepare(policy, optimizer)
    if cfg.lora.enabled:
        adapter_only_checkpoints(accelerator, policy)
    unwrapped = accelerator.unwrap_model(policy)
    reward = build_reward(cfg.reward, accelerator.device)
    monitor = OracleMonitor(cfg.reward.oracle_synonyms) if cfg.reward.oracle_synonyms else None
    stats = reward_stats(cfg, reward, records, accelerator, out)
    fp = fingerprint(cfg, {"advantage": cfg.advantage, "stats": stats})
    start = resume_step(cfg, accelerator, scheduler, fp)
    metrics = MetricsLogger(out, accelerator.is_main_process, cfg.run.report_to, resume_step=start,
                            config=to_dict(cfg))
    bar = progress(total, f"{cfg.advantage} ({len(records)} prompts)", initial=start,
                   enabled=accelerator.is_main_process, unit="step")
    for step in range(start + 1, total + 1):
        started = time.perf_counter()
        rollouts = collect(cfg, accelerator, unwrapped, frozen, processor, records, reward, step)
        shaped, kl, adv = advantages(cfg, rollouts, stats)
        values, oracle = rollout_metrics(accelerator, rollouts, shaped, kl, monitor)
        save_rollouts(accelerator, rollouts, shaped, adv, kl, oracle, out / "rollouts", step)
        collected = time.perf_counter()
        values["lr"] = scheduler.get_last_lr()[0]
        values |= {f"time/{k}_s": v for k, v in rollouts.experience.seconds.items()}
        values |= update(cfg, accelerator, policy, optimizer, scheduler, step, len(shaped),
                         lambda rows: chunk_loss(cfg, policy, processor, rollouts, adv, rows, accelerator.device),
                         torch.ones_like(shaped), _STATS)
        values |= {"time/collect_s": collected - started, "time/update_s": time.perf_counter() - collected}
        if step % cfg.run.log_every == 0 or step == total:
            metrics.log(step, values)
        bar.update(1)
        bar.set_postfix(reward=f"{values['reward/score']:.3f}")
        step_checkpoint(accelerator, cfg.run, step, total, {"fingerprint": fp}, scheduler=scheduler,
                        save_adapter=lora_adapter_saver(accelerator, policy, processor, cfg.lora.enabled))
    bar.close()
    metrics.close()
    save_weights(accelerator, policy, processor, out, cfg.lora.enabled, merge=cfg.lora.enabled)
    if accelerator.is_main_process:
        save_config(cfg, out)
    accelerator.wait_for_everyone()
    logger.info("%s: %d steps -> %s", cfg.advantage, total, out)
    return out
