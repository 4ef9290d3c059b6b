"""Per-token log-probs and values of sampled answers, in the layout of a ``data.rollout_batches`` batch.

``ROLLOUT_LAYOUTS`` maps a layout name to (collate, token log-prob forward); both forwards return the answer
tokens' log-probs float[N, A] and mask bool[N, A] in answer coordinates (column j = the j-th answer token), so
RL code never sees which layout ran. ``token_values`` gives a scalar-head critic's value of the state before
each answer token (PPO), from a plain batch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from PIL import Image
from torch import Tensor

from mmalign.data.collate import IGNORE_INDEX
from mmalign.data.rollout_batches import collate_rollouts_plain, collate_rollouts_prefix
from mmalign.models.heads import ScalarHeadModel
from mmalign.models.logprobs import answer_token_logps, model_inputs
from mmalign.models.prefix_cache import prefix_cache_token_logps


def to_answer_layout(flat: Tensor, labels_mask: Tensor) -> tuple[Tensor, Tensor]:
    """Values of the N_a answer tokens of a plain batch (``flat`` [N_a, ...], row-major order of ``labels_mask``
    bool[N, T]) -> (float[N, A, ...] with column j = the j-th answer token of the row, mask bool[N, A])."""
    counts = labels_mask.sum(dim=1)
    mask = torch.arange(int(counts.max()), device=flat.device)[None, :] < counts[:, None]
    out = flat.new_zeros((*mask.shape, *flat.shape[1:]))
    out[mask] = flat
    return out, mask


def plain_token_logps(model: Any, batch: Mapping[str, Any]) -> tuple[Tensor, Tensor]:
    """Answer-token log-probs float[N, A] and mask bool[N, A] of a ``collate_rollouts_plain`` batch."""
    token_logps, labels_mask = answer_token_logps(model, batch)
    return to_answer_layout(token_logps[labels_mask], labels_mask)


ROLLOUT_LAYOUTS = {
    "prefix_cache": (collate_rollouts_prefix, prefix_cache_token_logps),
    "plain": (collate_rollouts_plain, plain_token_logps),
}


def token_values(critic: ScalarHeadModel, batch: Mapping[str, Any]) -> Tensor:
    """float32[N, A]: the critic head on the last hidden state of each position that predicts an answer token
    (the state before the token is emitted), from a ``collate_rollouts_plain`` batch."""
    labels_mask = batch["labels"] != IGNORE_INDEX
    predicts = torch.zeros_like(labels_mask)
    predicts[:, :-1] = labels_mask[:, 1:]
    out = critic.backbone(**model_inputs(batch), output_hidden_states=True, logits_to_keep=1, use_cache=False)
    hidden = out.hidden_states[-1][predicts]  # [N_a, H], row-major like the answer tokens
    values = critic.head(hidden.to(critic.head.weight.dtype)).squeeze(-1).float()
    return to_answer_layout(values, labels_mask)[0]


def rollout_logps(model: Any, processor: Any, prompts: Sequence[Any], images: Sequence[Sequence[Image.Image]],
                  answers: Sequence[list[int]], group: Sequence[int], layout: str, device: Any) -> tuple[Tensor, Tensor]:
    """Collate G prompts and N answers (token ids; ``group[n]`` = prompt of answer n) in ``layout`` on ``device``
    and return the answer tokens' log-probs float[N, A] and mask bool[N, A] under ``model``."""
    collate, forward = ROLLOUT_LAYOUTS[layout]
    batch = {k: v.to(device) for k, v in collate(processor, prompts, images, answers, group).items()}
    return forward(model, batch)
