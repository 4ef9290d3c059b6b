"""PPO on a VLM with a scalar-head critic (Apple arXiv 2407.02477 Eq. 2, Sec. 5.5; Schulman et al. 2017).

One recipe: ``PPOConfig`` + ``train_ppo(cfg)``. Each step (``trainers.rl_common``):

1. **rollouts**: k answers per prompt from the current policy, scored by the reward, with their tokens'
   log-probs under the sampling policy and the reference, and the critic's value of the state before each
   answer token (``models.rollout_forward.token_values``);
2. **per-token rewards** as TRL's ``PPOTrainer``: ``-kl.beta * kl_t`` on every token plus the standardised,
   length-penalised score on the answer's last token; **GAE** (``value.gamma``, ``value.lam``) gives
   advantages (whitened over the step's tokens on each process) and returns;
3. **update**: ``update_epochs`` passes (Apple: 3) x ``minibatches`` optimizer steps on the token-mean of the
   clipped surrogate + ``value.coef`` x the clipped value loss.

Policy and critic are one module (``ActorCritic``, as TRL's ``PolicyAndValueWrapper``): one optimizer, one
gradient clip, one ``accelerator.prepare``, so DDP sees every trainable tensor in one forward. The critic is a
``models.heads.ScalarHeadModel`` on ``value.path`` (default: the policy's model), trained under the same LoRA /
full setting as the policy; a reward-model folder as ``value.path`` also initialises its head (TRL initialises
the value model from the reward model). Outputs as ``trainers.rloo`` (the policy's weights only).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mmalign.config import ConfigError, save_config, to_dict
from mmalign.data.rollout_batches import collate_rollouts_plain
from mmalign.models.heads import HEAD_FILE, ScalarHeadModel, load_reward_model
from mmalign.models.loading import freeze_vision_tower, load_vlm
from mmalign.models.lora import LoraConfig, add_lora, disable_dropout
from mmalign.models.rollout_forward import ROLLOUT_LAYOUTS, token_values
from mmalign.objectives.policy_gradient import (
    KL_ESTIMATORS, clipped_policy_loss, clipped_value_loss, gae, ppo_token_rewards, sequence_kl, whiten,
)
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

_STATS = ("loss", "policy_loss", "value_loss", "clip_fraction", "value_clip_fraction")


@dataclass
class ValueConfig:
    """The critic and GAE: ``path`` (model folder, "" = ``model.path``; a reward-model folder also gives the head),
    ``coef`` (weight of the value loss, TRL 0.1), ``clip`` (value clipping range, TRL 0.2), ``gamma``, ``lam``
    (GAE, TRL 1.0 and 0.95)."""

    path: str = ""  # critic's initial weights ("": model.path; a reward-model folder also gives the head)
    coef: float = 0.1  # weight of the value loss
    clip: float = 0.2  # value clipping range around the sampling-time values
    gamma: float = 1.0  # GAE discount
    lam: float = 0.95  # GAE lambda

    def __post_init__(self) -> None:
        if self.coef < 0 or self.clip <= 0 or not 0 < self.gamma <= 1 or not 0 <= self.lam <= 1:
            raise ValueError("value needs coef >= 0, clip > 0, 0 < gamma <= 1 and 0 <= lam <= 1")


@dataclass
class PPOConfig(RLRecipeConfig):
    """``RLRecipeConfig`` plus the critic (``value``)."""

    value: ValueConfig = field(default_factory=ValueConfig)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.kl.placement != "reward":
            raise ValueError("PPO puts the KL in each token's reward: kl.placement must be reward")


class ActorCritic(torch.nn.Module):
    """The policy and the critic as one module: ``forward`` returns both models' outputs on a minibatch."""

    def __init__(self, policy: Any, critic: ScalarHeadModel, layout: str):
        super().__init__()
        self.policy, self.critic, self.layout = policy, critic, layout

    def forward(self, policy_batch: dict, critic_batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(answer-token log-probs float[N, A], answer mask bool[N, A], values float[N, A])."""
        token_logps, mask = ROLLOUT_LAYOUTS[self.layout][1](self.policy, policy_batch)
        return token_logps, mask, token_values(self.critic, critic_batch)


def build_critic(path: str, dtype: str | None, lora: LoraConfig | None) -> ScalarHeadModel:
    """A scalar-head critic on ``path`` (a reward-model folder keeps its head), vision tower frozen, dropout off,
    LoRA on its language model when ``lora`` is given (then only the adapter and the head train)."""
    if (Path(path) / HEAD_FILE).is_file():
        critic, _ = load_reward_model(path, dtype=dtype)
    else:
        critic = ScalarHeadModel(load_vlm(path, dtype=dtype)[0])
    disable_dropout(critic)
    freeze_vision_tower(critic.backbone)
    if lora is not None:
        critic.backbone = add_lora(critic.backbone, lora, [])[0]
    return critic.train()


def critic_values(critic: ScalarHeadModel, processor: Any, step: StepRollouts, batch_size: int,
                  device: Any) -> torch.Tensor:
    """float[N, A]: the critic's values of the step's rollouts, no gradients, ``batch_size`` rows a pass."""
    width = step.tokens.answer_ids.shape[1]
    rows = torch.arange(len(step.tokens.group), device=device)
    chunks = []
    with torch.no_grad():
        for part in rows.split(batch_size):
            prompts, images, answers, group = batch_inputs(step, part)
            batch = {k: v.to(device) for k, v in collate_rollouts_plain(processor, prompts, images, answers,
                                                                        group).items()}
            values = token_values(critic, batch)
            chunks.append(torch.nn.functional.pad(values, (0, width - values.shape[1])))
    return torch.cat(chunks)


def advantages(cfg: PPOConfig, step: StepRollouts, stats: tuple[float, float] | None
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Fill the step's advantages and returns (float[N, A]); returns (shaped sequence reward float[N], KL [N])."""
    tokens = step.tokens
    token_kl = KL_ESTIMATORS[cfg.kl.estimator](tokens.policy_token_logps, tokens.ref_token_logps)
    scores = shaped_scores(cfg, tokens, stats)
    token_rewards = ppo_token_rewards(scores, token_kl, tokens.answer_mask, cfg.kl.beta)
    adv, tokens.returns = gae(token_rewards, tokens.values, tokens.answer_mask, cfg.value.gamma, cfg.value.lam)
    tokens.advantages = whiten(adv, tokens.answer_mask)
    kl = sequence_kl(token_kl, tokens.answer_mask)
    return scores - cfg.kl.beta * kl, kl


def chunk_loss(cfg: PPOConfig, model: Any, processor: Any, step: StepRollouts, rows: torch.Tensor,
               device: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-summed PPO loss (clipped surrogate + coef x clipped value loss) of ``rows`` and ``_STATS`` sums."""
    prompts, images, answers, group = batch_inputs(step, rows)
    policy_batch = ROLLOUT_LAYOUTS[cfg.forward][0](processor, prompts, images, answers, group)
    critic_batch = collate_rollouts_plain(processor, prompts, images, answers, group)
    token_logps, mask, values = model({k: v.to(device) for k, v in policy_batch.items()},
                                      {k: v.to(device) for k, v in critic_batch.items()})
    old = step.tokens.rows(rows)
    width = mask.shape[1]
    pg, clipped = clipped_policy_loss(token_logps, old.policy_token_logps[:, :width], old.advantages[:, :width],
                                      cfg.clip)
    vf, value_clipped = clipped_value_loss(values, old.values[:, :width], old.returns[:, :width], cfg.value.clip)
    m = mask.to(pg.dtype)
    loss = ((pg + cfg.value.coef * vf) * m).sum()
    stats = [loss.detach(), (pg * m).sum().detach(), (vf * m).sum().detach(), (clipped * mask).sum(),
             (value_clipped * mask).sum()]
    return loss, torch.stack([s.float() for s in stats])


def train_ppo(cfg: PPOConfig) -> Path:
    """Run PPO; returns the output directory. Folder lock, checkpoints (each with the policy's loadable
    ``adapter/`` under LoRA), resumption and the non-finite stop as in ``rloo.train_rloo``."""
    if not cfg.model.path or not cfg.data.prompts:
        raise ConfigError("model.path and data.prompts are required")
    with claim_folder(cfg.run.output_dir):
        return _train_ppo(cfg)


def _train_ppo(cfg: PPOConfig) -> Path:
    out = Path(cfg.run.output_dir)
    cfg, accelerator, policy, processor, frozen, projector = start_rl(cfg)
    critic = build_critic(cfg.value.path or cfg.model.path, cfg.model.dtype, cfg.lora if cfg.lora.enabled else None)
    model = ActorCritic(policy, critic, cfg.forward)
    records = load_prompts(cfg.data)
    per_epoch = steps_per_epoch(len(records), cfg.batch_size)  # also refuses a batch larger than the data
    total = cfg.max_steps or cfg.epochs * per_epoch
    if frozen is not None:
        frozen.to(accelerator.device)
    optimizer = build_optimizer(model, cfg.optim, [f"policy.{name}" for name in projector])
    scheduler = build_scheduler(optimizer, cfg.optim, total * cfg.update_epochs * cfg.minibatches)
    model, optimizer = accelerator.prepare(model, optimizer)
    if cfg.lora.enabled:
        adapter_only_checkpoints(accelerator, model)
    unwrapped = accelerator.unwrap_model(model)
    reward = build_reward(cfg.reward, accelerator.device)
    monitor = OracleMonitor(cfg.reward.oracle_synonyms) if cfg.reward.oracle_synonyms else None
    stats = reward_stats(cfg, reward, records, accelerator, out)
    fp = fingerprint(cfg, {"value": dataclasses.asdict(cfg.value), "stats": stats})
    start = resume_step(cfg, accelerator, scheduler, fp)
    metrics = MetricsLogger(out, accelerator.is_main_process, cfg.run.report_to, resume_step=start,
                            config=to_dict(cfg))
    bar = progress(total, f"ppo ({len(records)} prompts)", initial=start, enabled=accelerator.is_main_process,
                   unit="step")
    for step in range(start + 1, total + 1):
        started = time.perf_counter()
        rollouts = collect(cfg, accelerator, unwrapped.policy, frozen, processor, records, reward, step)
        with accelerator.autocast():
            rollouts.tokens.values = critic_values(unwrapped.critic, processor, rollouts, cfg.rollout.batch_size,
                                                   accelerator.device)
        shaped, kl = advantages(cfg, rollouts, stats)
        values, oracle = rollout_metrics(accelerator, rollouts, shaped, kl, monitor)
        mask = rollouts.tokens.answer_mask
        mean_adv = (rollouts.tokens.advantages * mask).sum(-1) / mask.sum(-1)
        save_rollouts(accelerator, rollouts, shaped, mean_adv, kl, oracle, out / "rollouts", step)
        collected = time.perf_counter()
        values["lr"] = scheduler.get_last_lr()[0]
        values |= {f"time/{k}_s": v for k, v in rollouts.experience.seconds.items()}
        values |= update(cfg, accelerator, model, optimizer, scheduler, step, len(shaped),
                         lambda rows: chunk_loss(cfg, model, processor, rollouts, rows, accelerator.device),
                         mask.sum(-1).float(), _STATS)
        values |= {"time/collect_s": collected - started, "time/update_s": time.perf_counter() - collected}
        if step % cfg.run.log_every == 0 or step == total:
            metrics.log(step, values)
        bar.update(1)
        bar.set_postfix(reward=f"{values['reward/score']:.3f}")
        step_checkpoint(accelerator, cfg.run, step, total, {"fingerprint": fp}, scheduler=scheduler,
                        save_adapter=lora_adapter_saver(accelerator, unwrapped.policy, processor, cfg.lora.enabled))
    bar.close()
    metrics.close()
    save_weights(accelerator, unwrapped.policy, processor, out, cfg.lora.enabled, merge=cfg.lora.enabled)
    if accelerator.is_main_process:
        save_config(cfg, out)
    accelerator.wait_for_everyone()
    logger.info("ppo: %d steps -> %s", total, out)
    return out
