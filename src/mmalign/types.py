"""Typed containers the online stages hand each other (lowest layer: imports torch only).

``mmalign.sampling`` produces one ``Experience`` per step and every online trainer consumes it:
- the preference recipes (Online-DPO, Mixed-DPO, Online-BDHS) read ``Experience.rollouts``: per prompt, the
  sampled answers, what the annotator or reward said of them, and the training pair built from them;
- the RL recipes (RLOO, GRPO, PPO) read ``Experience.tokens`` as well: the sampled token ids with the
  log-probs of the sampling policy and of the reference; the trainer fills in rewards, advantages and
  (PPO) values and returns with ``mmalign.objectives.policy_gradient``.
``Rollout.to_json`` / ``Rollout.from_json`` are the one place a step's line on disk is written and read.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor


@dataclass
class Rollout:
    """One prompt of one step.

    record_id: the prompt record; source: "online" (k sampled answers ranked by an annotator), "offline" (the
    record's own pair, Mixed-DPO), "online_bdhs" (a BDHS answer of the current policy) or "rl";
    answers: the answers sampled for it (empty for an offline pair); chosen / rejected: indices into
    ``answers`` of the annotator's pair (None: no preference or not ranked); verdict: what the annotator,
    BDHS or the reward said (JSON-able, for audit); pair: the training record in JSON form
    (``mmalign.data.record_files.record_to_json``) or None when the prompt gives no pair this step;
    rewards: one reward per answer (annotator scores; RL: the shaped reward), None when there is none.
    """

    record_id: str
    source: str
    answers: list[str] = field(default_factory=list)
    chosen: int | None = None
    rejected: int | None = None
    verdict: dict[str, Any] = field(default_factory=dict)
    pair: dict[str, Any] | None = None
    rewards: list[float] | None = None

    @property
    def margin(self) -> float | None:
        """rewards[chosen] - rewards[rejected]: the per-pair reward margin (MM-DPO), None without both."""
        if self.rewards is None or self.chosen is None or self.rejected is None:
            return None
        return self.rewards[self.chosen] - self.rewards[self.rejected]

    def to_json(self) -> dict[str, Any]:
        """The step-file line; the sampled answers are stored under ``rollouts``."""
        out = dataclasses.asdict(self)
        out["rollouts"] = out.pop("answers")
        return out

    @classmethod
    def from_json(cls, entry: dict[str, Any]) -> Rollout:
        fields = dict(entry)
        fields["answers"] = fields.pop("rollouts", [])
        return cls(**fields)


@dataclass
class TokenRollouts:
    """The sampled answers of a step at token level: N rows in G prompt groups, A = the longest answer.

    group long[N]: index (into ``Experience.rollouts``) of each row's prompt; answer_ids long[N, A]: the
    generated tokens, right-padded; answer_mask bool[N, A]: True up to and including the first EOS;
    ref_token_logps float[N, A]: log-probs of each token under the reference (0 off the mask); scores float[N]:
    the reward source's raw score of each answer; policy_token_logps float[N, A]: log-probs under the policy
    that sampled the tokens, None when the recipe needs none (an on-policy update with the KL in the loss).
    Filled by the trainer: rewards float[N] (normalised, penalised); advantages float[N] (RLOO, GRPO) or
    float[N, A] (PPO); values / returns float[N, A] (PPO critic at sampling time, GAE returns).
    """

    group: Tensor
    answer_ids: Tensor
    answer_mask: Tensor
    ref_token_logps: Tensor
    scores: Tensor
    policy_token_logps: Tensor | None = None
    rewards: Tensor | None = None
    advantages: Tensor | None = None
    values: Tensor | None = None
    returns: Tensor | None = None

    def __post_init__(self) -> None:
        n, a = self.answer_ids.shape
        for name in ("answer_mask", "policy_token_logps", "ref_token_logps"):
            if getattr(self, name) is not None and getattr(self, name).shape != (n, a):
                raise ValueError(f"{name} has shape {tuple(getattr(self, name).shape)}, expected {(n, a)}")
        if self.group.shape != (n,) or self.scores.shape != (n,):
            raise ValueError(f"group and scores must be [{n}], got {tuple(self.group.shape)} and "
                             f"{tuple(self.scores.shape)}")

    def rows(self, index: Tensor) -> TokenRollouts:
        """The rows ``index`` (long[M]) of every tensor, e.g. a PPO minibatch."""
        return TokenRollouts(**{f.name: None if getattr(self, f.name) is None else getattr(self, f.name)[index]
                                for f in dataclasses.fields(self)})


@dataclass
class Experience:
    """One step of an online trainer on one process: a ``Rollout`` per prompt, for RL the token rows, and the
    wall-clock seconds of each sampling stage (e.g. generate, score, logps) for the time report."""

    rollouts: list[Rollout]
    tokens: TokenRollouts | None = None
    seconds: dict[str, float] = field(default_factory=dict)
