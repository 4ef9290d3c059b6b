"""Preference-batch layouts by name: a trainer's ``forward`` field picks one (collate, forward) pair.

Every forward takes (model, batch) and returns the same ``PreferenceForward``; all three give the same
log-probs and gradients (``tests/unit/test_shared_prefix.py``), and differ in cost:
- ``prefix_cache``: prompt + images once per record, answers against its KV cache (least work; refuses
  sliding windows shorter than the rows, Gemma3's image blocks and activation checkpointing);
- ``shared_prefix``: one packed row per record with a block attention mask (every supported family);
- ``plain``: one row per (record, answer), prompt and images repeated (the reference layout).
``auto`` (the trainers' default) is resolved once per run by ``resolve_layout``: ``prefix_cache`` where it is
exact for the model, else ``shared_prefix``.
"""

from __future__ import annotations

import logging
from typing import Any

from mmalign.data.collate import collate_preference
from mmalign.data.packing import collate_prefix_cache, collate_shared_prefix
from mmalign.models.logprobs import preference_forward
from mmalign.models.prefix_cache import prefix_cache_forward, prefix_cache_refusal
from mmalign.models.shared_prefix import shared_prefix_forward

logger = logging.getLogger(__name__)

PREFERENCE_LAYOUTS = {
    "prefix_cache": (collate_prefix_cache, prefix_cache_forward),
    "shared_prefix": (collate_shared_prefix, shared_prefix_forward),
    "plain": (collate_preference, preference_forward),
}


def resolve_layout(name: str, model: Any, max_length: int, *, activation_checkpointing: bool = False) -> str:
    """The layout a trainer runs: ``name`` itself, or for ``auto`` the fastest layout exact for ``model``.

    ``max_length`` bounds prompt + answer of every record, so a batch's prompt width + answer width, which is
    what a sliding window must cover in the prefix-cache forward, is below 2 x ``max_length``.
    ``activation_checkpointing``: applied outside the model (FSDP's wrapper). Families that no shared layout
    supports raise (``shared_prefix.family_rules``).
    """
    if name != "auto":
        return name
    refusal = prefix_cache_refusal(model, 2 * max_length, activation_checkpointing=activation_checkpointing)
    if refusal is None:
        logger.info("forward: auto -> prefix_cache")
        return "prefix_cache"
    logger.info("forward: auto -> shared_prefix, as the prefix-cache forward would not be exact: %s", refusal)
    return "shared_prefix"
