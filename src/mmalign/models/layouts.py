"""Preference-batch layouts by name: a trainer's ``forward`` field picks one (collate, forward) pair.

Every forward takes (model, batch) and returns the same ``PreferenceForward``; all three give the same
log-probs and gradients (``tests/unit/test_shared_prefix.py``), and differ in cost:
- ``prefix_cache``: prompt + images once per record, answers against its KV cache (least work; refuses
  sliding-window / Gemma3 models and activation checkpointing);
- ``shared_prefix``: one packed row per record with a block attention mask (every supported family);
- ``plain``: one row per (record, answer), prompt and images repeated (the reference layout).
"""

from __future__ import annotations

from mmalign.data.collate import collate_preference
from mmalign.data.packing import collate_prefix_cache, collate_shared_prefix
from mmalign.models.logprobs import preference_forward
from mmalign.models.prefix_cache import prefix_cache_forward
from mmalign.models.shared_prefix import shared_prefix_forward

PREFERENCE_LAYOUTS = {
    "prefix_cache": (collate_prefix_cache, prefix_cache_forward),
    "shared_prefix": (collate_shared_prefix, shared_prefix_forward),
    "plain": (collate_preference, preference_forward),
}
