"""Shared-prefix preference forward: image and prompt encoded once per record, every answer scored against them.

A ``data.packing.collate_shared_prefix`` batch holds one row per record, [prefix | chosen | rejected_1 | ... ].
The vision tower sees each record's images once and the language model reads the prefix once; a block
attention mask lets each answer token attend to the prefix and causally to its own answer only, and position
ids restart every answer at the end of the prefix. Each answer token then computes exactly what it computes in
the plain concatenated layout (``logprobs.preference_forward``), so log-probs and gradients match it while the
per-record cost drops from (K + 1) x (P + A) tokens to P + (K + 1) x A (P prefix incl. image tokens, A answer
tokens; Wang & Hegde, arXiv 2410.20305, do the same for text-only DPO).

Family rules (what the plain forward's own mask creation does, reproduced per packed answer):
- causal order and sliding windows (Mistral's ``sliding_window``, Gemma3's sliding layers) are taken over the
  *virtual* plain row [prefix | answer], i.e. over ``order_ids``, not over packed indices;
- Gemma3: image tokens attend bidirectionally within their image (``token_type_ids == 1`` runs);
- Qwen2-VL / Qwen2.5-VL mRoPE: prefix positions from the model's own ``get_rope_index``; answer text positions
  continue from the prefix's largest position + 1 on all three axes, as ``get_rope_index`` does for text after
  an image.
Families without shared-prefix rules in ``models.families``, non-causal text models and attention kernels that take
no dense mask are refused.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from accelerate.utils import extract_model_from_parallel
from torch import Tensor

from mmalign.data.collate import IGNORE_INDEX
from mmalign.data.packing import CHOSEN_SEGMENT, PAD_SEGMENT, PREFIX_SEGMENT
from mmalign.models.families import FAMILIES, Family
from mmalign.models.logprobs import PreferenceForward

# Packing bookkeeping that is not a model input (attention_mask is replaced by the block mask).
_PACKING_KEYS = ("labels", "segment_ids", "order_ids", "attention_mask")
# Attention kernels that add a dense [B, 1, T, T] mask; flash / flex kernels take no such mask.
_DENSE_MASK_KERNELS = ("eager", "sdpa")


def family_rules(config: Any) -> Family:
    """The shared-prefix rules of a VLM config; a clear error where the packed forward cannot be exact."""
    rules = FAMILIES.get(config.model_type)
    if rules is None or not rules.shared_prefix:
        supported = [name for name, fam in FAMILIES.items() if fam.shared_prefix]
        raise ValueError(f"shared-prefix forward: model_type {config.model_type!r} is not supported (supported: "
                         f"{', '.join(supported)}); use forward: plain")
    text = config.get_text_config()
    for cfg in (config, text):
        if cfg._attn_implementation not in _DENSE_MASK_KERNELS:
            raise ValueError(f"shared-prefix forward needs an attention kernel that takes a dense mask "
                             f"({' / '.join(_DENSE_MASK_KERNELS)}), got {cfg._attn_implementation!r}")
    if getattr(text, "use_bidirectional_attention", False):
        raise ValueError("shared-prefix forward: the text model attends bidirectionally, so answers cannot share "
                         "a prefix exactly; use forward: plain")
    return rules


def image_block_ids(token_type_ids: Tensor) -> Tensor:
    """long[B, T]: index of the image run each image token (type 1) belongs to, -1 elsewhere (Gemma3's rule)."""
    is_image = token_type_ids == 1
    starts = is_image & ~torch.nn.functional.pad(is_image, (1, 0))[:, :-1]
    return torch.where(is_image, starts.long().cumsum(dim=1) - 1, -1)


def block_attention_mask(segment_ids: Tensor, order_ids: Tensor, *, window: int | None = None,
                         image_blocks: Tensor | None = None) -> Tensor:
    """Block mask bool[B, 1, L, L] (True = attend) of packed rows.

    segment_ids / order_ids long[B, L] from ``pack_answers``. Query q sees key k when k is in the prefix or in
    q's own answer, k is not padding, and k precedes q in the virtual plain row (order_k <= order_q) or shares
    q's image block (image_blocks long[B, L], -1 = none); with a sliding ``window``, additionally
    order_q - order_k < window. Every query sees itself, so padding rows (never read) stay finite.
    """
    seg_q, seg_k = segment_ids[:, :, None], segment_ids[:, None, :]
    ord_q, ord_k = order_ids[:, :, None], order_ids[:, None, :]
    visible = ((seg_k == PREFIX_SEGMENT) | (seg_k == seg_q)) & (seg_k != PAD_SEGMENT)
    allowed = ord_k <= ord_q
    if image_blocks is not None:
        blk_q, blk_k = image_blocks[:, :, None], image_blocks[:, None, :]
        allowed = allowed | ((blk_q == blk_k) & (blk_q >= 0))
    if window is not None:
        allowed = allowed & (ord_q - ord_k < window)
    keep = visible & allowed
    keep = keep | torch.eye(keep.shape[-1], dtype=torch.bool, device=keep.device)
    return keep[:, None]


def text_masks(config: Any, batch: Mapping[str, Any], rules: Family, dtype: torch.dtype) -> Tensor | dict:
    """The block mask(s) the language model takes: one [B, 1, L, L] tensor, or ``{layer_type: mask}`` for
    text models with per-layer attention types (Gemma3 sliding layers, Qwen2-VL). In the format transformers'
    own masks have per kernel: bool for sdpa, additive ``dtype`` (0 / dtype min) for eager."""
    text = config.get_text_config()
    blocks = image_block_ids(batch["token_type_ids"]) if rules.image_blocks else None
    additive = text._attn_implementation == "eager"

    def build(window: int | None) -> Tensor:
        keep = block_attention_mask(batch["segment_ids"], batch["order_ids"], window=window, image_blocks=blocks)
        if not additive:
            return keep
        return torch.zeros(keep.shape, dtype=dtype, device=keep.device).masked_fill(~keep, torch.finfo(dtype).min)

    layer_types = getattr(text, "layer_types", None)  # only configs with per-layer attention types carry it
    if layer_types is None:
        # Mistral-style configs carry one window for every layer (Llama none); masking_utils reads it the same way.
        return build(getattr(text, "sliding_window", None))
    windows = {"full_attention": None, "sliding_attention": text.sliding_window}
    unknown = set(layer_types) - set(windows)
    if unknown:
        raise ValueError(f"shared-prefix forward: unsupported attention layer types {sorted(unknown)}")
    return {kind: build(windows[kind]) for kind in set(layer_types)}


def vlm_core(model: Any) -> Any:
    """The base VLM (``XModel``, owner of ``get_rope_index``) under an optional PEFT wrapper."""
    from peft import PeftModel

    top = model.get_base_model() if isinstance(model, PeftModel) else model
    return top.model


def position_ids(model: Any, batch: Mapping[str, Any], rules: Family) -> Tensor:
    """long[B, L] (``order_ids``), or long[3, B, L] mRoPE positions: the prefix's from ``get_rope_index``,
    each answer's text positions continuing from the prefix's largest position + 1 on all three axes."""
    order = batch["order_ids"]
    if not rules.mrope:
        return order
    segments = batch["segment_ids"]
    prefix = segments == PREFIX_SEGMENT
    positions, _ = vlm_core(model).get_rope_index(
        batch["input_ids"], mm_token_type_ids=batch["mm_token_type_ids"],
        image_grid_thw=batch.get("image_grid_thw"), attention_mask=prefix.long(),
    )
    prefix_len = prefix.sum(dim=1, keepdim=True)  # [B, 1]
    start = positions.masked_fill(~prefix, -1).amax(dim=(0, 2))[:, None] + 1  # [B, 1]
    answer_pos = start + order - prefix_len  # [B, L]
    return torch.where(segments > PREFIX_SEGMENT, answer_pos, positions)


def _predictors(segments: Tensor, answer_mask: Tensor) -> Tensor:
    """long[B, L]: packed index whose logits predict each answer token (the previous token of the same answer,
    the last prefix token for an answer's first token); 0 where no answer token."""
    idx = torch.arange(segments.shape[1], device=segments.device).expand_as(segments)
    first = answer_mask & (segments != torch.nn.functional.pad(segments, (1, 0), value=PAD_SEGMENT)[:, :-1])
    last_prefix = (segments == PREFIX_SEGMENT).sum(dim=1, keepdim=True) - 1
    predictor = torch.where(first, last_prefix.expand_as(idx), idx - 1)
    return predictor.masked_fill(~answer_mask, 0)


def shared_prefix_inputs(core: Any, batch: Mapping[str, Any]) -> dict[str, Any]:
    """The model's keyword arguments for a packed batch: its processor entries, the block mask(s) as
    ``attention_mask`` and the ``position_ids``. ``core``: the bare VLM (attributes only)."""
    rules = family_rules(core.config)
    dtype = core.get_input_embeddings().weight.dtype
    inputs = {k: v for k, v in batch.items() if k not in _PACKING_KEYS}
    return inputs | {"attention_mask": text_masks(core.config, batch, rules, dtype),
                     "position_ids": position_ids(core, batch, rules)}


def packed_logits_plan(segments: Tensor, token_mask: Tensor) -> tuple[Tensor, Tensor]:
    """(keep bool[B, L]: the distinct packed positions whose logits predict a token of ``token_mask`` bool[B, L];
    predictor long[B, L]: the position predicting each such token). Pass ``keep`` as ``logits_to_keep``."""
    predictor = _predictors(segments, token_mask)
    keep = torch.zeros_like(token_mask)
    keep[token_mask.nonzero(as_tuple=True)[0], predictor[token_mask]] = True
    return keep, predictor


def packed_token_logps(logits: Tensor, keep: Tensor, predictor: Tensor, labels: Tensor, token_mask: Tensor) -> Tensor:
    """float[B, L] log-probs of the tokens of ``token_mask`` (0 elsewhere) from ``logits`` [N_k, V] kept at ``keep``
    (``packed_logits_plan``); a position shared by several tokens (the last prefix token) is read for each."""
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # log-softmax in >= float32
    rank = keep.flatten().cumsum(0).view_as(keep) - 1  # row of each kept position in ``logits``
    rows = rank[token_mask.nonzero(as_tuple=True)[0], predictor[token_mask]]  # [N_a]
    picked = logits[rows].gather(-1, labels[token_mask].unsqueeze(-1)).squeeze(-1) - logits.logsumexp(-1)[rows]
    token_logps = torch.zeros(labels.shape, dtype=picked.dtype, device=picked.device)
    return token_logps.masked_scatter(token_mask, picked)


def shared_prefix_token_logps(model: Any, batch: Mapping[str, Any]) -> tuple[Tensor, Tensor]:
    """Answer-token log-probs float[B, L] (0 off answers) and answer mask bool[B, L] of a packed batch.

    Logits are built only at the N_k distinct positions that predict an answer token ([N_k, V]); the last
    prefix token's logits are computed once and serve the first token of every answer.
    """
    # Attributes come from the bare model; the call goes through the wrapper (DDP / DeepSpeed / FSDP) so
    # gradient sync and parameter gathering happen.
    core = extract_model_from_parallel(model)
    labels = batch["labels"]
    answer_mask = labels != IGNORE_INDEX
    keep, predictor = packed_logits_plan(batch["segment_ids"], answer_mask)
    logits = model(**shared_prefix_inputs(core, batch), logits_to_keep=keep, use_cache=False).logits
    return packed_token_logps(logits, keep, predictor, labels, answer_mask), answer_mask


def shared_prefix_forward(model: Any, batch: Mapping[str, Any]) -> PreferenceForward:
    """``preference_forward`` on a ``collate_shared_prefix`` batch of R records, K = most rejected answers.

    Returns the same ``PreferenceForward``: chosen_logps [R], rejected_logps [R, K] (0 where absent),
    rejected_mask [R, K], lengths, and chosen_token_logps / chosen_mask [R, L] laid out on the packed row.
    """
    token_logps, answer_mask = shared_prefix_token_logps(model, batch)
    segments = batch["segment_ids"]
    n_slots = int(segments.max()) + 1  # prefix, chosen, K rejected
    if n_slots < CHOSEN_SEGMENT + 2:
        raise ValueError("a shared-prefix batch needs at least one rejected answer")
    slot = segments.clamp(min=PREFIX_SEGMENT)
    sums = token_logps.new_zeros(len(segments), n_slots).scatter_add(1, slot, token_logps * answer_mask)
    lengths = token_logps.new_zeros(len(segments), n_slots).scatter_add(1, slot, answer_mask.to(token_logps.dtype))
    is_chosen = answer_mask & (segments == CHOSEN_SEGMENT)
    rejected_lengths = lengths[:, CHOSEN_SEGMENT + 1:]
    return PreferenceForward(
        sums[:, CHOSEN_SEGMENT], sums[:, CHOSEN_SEGMENT + 1:], rejected_lengths > 0, lengths[:, CHOSEN_SEGMENT],
        rejected_lengths, token_logps * is_chosen, is_chosen,
    )

