"""Prefix-cache preference forward: the prompt (with its images) once per record, answers against its KV cache.

Two model calls per batch. The first runs the R left-padded prompts (vision tower + language model, each
family's own masking and positions) and keeps their key/value cache *with gradients*. The cache is gathered
to the N answer rows (``index_select``, differentiable), and the second call runs only the answer tokens
against it. Attention work is then what each token needs: causal over the prompt, and each answer over
[prompt | itself] -- unlike the packed layout of ``shared_prefix``, whose dense block mask also spends work on
the blocked answer-to-other-answer entries. Log-probs and gradients equal the plain concatenated forward.

Refused where the cache cannot reproduce the plain forward exactly: sliding-window attention shorter than
the rows (a left-padded cache shifts windows), Gemma3's bidirectional image blocks, and activation
checkpointing (which turns the cache off); use ``shared_prefix`` there.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from accelerate.utils import extract_model_from_parallel
from torch import Tensor

from mmalign.models.logprobs import PreferenceForward
from mmalign.models.shared_prefix import vlm_core, family_rules

_ANSWER_KEYS = ("answer_ids", "answer_mask", "answer_record", "answer_slot")


def prefix_cache_refusal(model: Any, total_length: int, *, activation_checkpointing: bool = False) -> str | None:
    """Why the prefix-cache forward cannot reproduce ``model``'s plain forward on batches whose prompt width +
    answer width reaches ``total_length`` tokens; None where it can. Unsupported families (``family_rules``)
    raise. ``activation_checkpointing``: checkpointing applied outside the model (FSDP's wrapper)."""
    rules = family_rules(model.config)
    text = model.config.get_text_config()
    windows = [getattr(text, "sliding_window", None)] if getattr(text, "layer_types", None) is None else [
        text.sliding_window for kind in text.layer_types if kind == "sliding_attention"]
    if rules.image_blocks:
        return f"{model.config.model_type} attends bidirectionally within image blocks, which a cache cannot split"
    short = [w for w in windows if w is not None and w < total_length]
    if short:
        return (f"{model.config.model_type} masks by a sliding window shorter than the rows ({min(short)} < "
                f"{total_length} tokens), which a left-padded cache shifts")
    if model.is_activation_checkpointing or activation_checkpointing:
        return "activation checkpointing is on, which turns the KV cache off or recomputes the layers that fill it"
    return None


def _check_supported(model: Any, total_length: int) -> Any:
    refusal = prefix_cache_refusal(model, total_length)
    if refusal is not None:
        raise ValueError(f"prefix-cache forward: {refusal}; use forward: shared_prefix")
    return family_rules(model.config)


def _prompt_positions(model: Any, prompt: Mapping[str, Any], mrope: bool) -> tuple[Tensor, Tensor]:
    """Prompt positions (long[R, T_p] or mRoPE long[3, R, T_p]) and each prompt's next position long[R]."""
    mask = prompt["attention_mask"].bool()
    if not mrope:
        positions = (mask.long().cumsum(dim=1) - 1).clamp(min=0)  # left padding: real tokens from 0
        return positions, mask.sum(dim=1)
    positions, _ = vlm_core(model).get_rope_index(
        prompt["input_ids"], mm_token_type_ids=prompt["mm_token_type_ids"],
        image_grid_thw=prompt.get("image_grid_thw"), attention_mask=mask.long(),
    )
    return positions, positions.masked_fill(~mask, -1).amax(dim=(0, 2)) + 1


def prefix_cache_forward(model: Any, batch: Mapping[str, Any]) -> PreferenceForward:
    """``preference_forward`` on a ``collate_prefix_cache`` batch: R records, N answer rows, K most rejected.

    Returns chosen_logps [R], rejected_logps [R, K] (0 where absent), rejected_mask [R, K], lengths, and
    chosen_token_logps / chosen_mask [R, A] on the answer rows (A = longest answer).
    """
    token_logps, answer_mask = prefix_cache_token_logps(model, batch)
    return _per_record(token_logps, answer_mask, batch["answer_record"], batch["answer_slot"])


def prefix_cache_calls(model: Any, core: Any, batch: Mapping[str, Any], keep: Tensor) -> tuple[Any, Any]:
    """The two model calls on a ``collate_prefix_cache`` batch: (prompt output, answer output).

    The prompt call keeps the logits of each prompt's last token ([R, V], they predict every answer's first
    token); the answer call keeps them at ``keep`` bool[N, A]. ``core``: the bare VLM (attributes only);
    ``model`` is what is called (any wrapper).
    """
    prompt = {k: v for k, v in batch.items() if k not in _ANSWER_KEYS}
    answer_ids, answer_mask = batch["answer_ids"], batch["answer_mask"].bool()
    record = batch["answer_record"]
    rules = _check_supported(core, prompt["input_ids"].shape[1] + answer_ids.shape[1])
    positions, start = _prompt_positions(core, prompt, rules.mrope)
    last = torch.zeros_like(prompt["attention_mask"], dtype=torch.bool)
    last[:, -1] = True  # left-padded: the last column is every prompt's last token
    first = model(**prompt, position_ids=positions, use_cache=True, logits_to_keep=last)
    cache = first.past_key_values
    cache.reorder_cache(record)  # [R] -> [N] rows, differentiable gather of every layer's keys and values

    answer_positions = start[record][:, None] + torch.arange(answer_ids.shape[1], device=answer_ids.device)
    if rules.mrope:  # text after the prompt: the same position on all three axes
        answer_positions = answer_positions[None].expand(3, -1, -1)
    rest = model(input_ids=answer_ids, attention_mask=torch.cat([prompt["attention_mask"][record],
                                                                 answer_mask.long()], dim=1),
                 position_ids=answer_positions, past_key_values=cache, use_cache=True, logits_to_keep=keep)
    return first, rest


def prefix_cache_token_logps(model: Any, batch: Mapping[str, Any]) -> tuple[Tensor, Tensor]:
    """Answer-token log-probs float[N, A] (0 off answers) and the answer mask bool[N, A] of a batch of R
    left-padded prompts (with images) and N answer rows (``answer_ids`` / ``answer_mask`` [N, A], the prompt
    of each row in ``answer_record`` [N]); each prompt is run once, its answers against its KV cache."""
    answer_ids, answer_mask = batch["answer_ids"], batch["answer_mask"].bool()
    record = batch["answer_record"]
    core = extract_model_from_parallel(model)  # attributes from the bare model, calls through any wrapper
    keep = torch.zeros_like(answer_mask)
    keep[:, :-1] = answer_mask[:, 1:]  # positions that predict a later answer token of the same row
    first, rest = prefix_cache_calls(model, core, batch, keep)

    wide = torch.promote_types(rest.logits.dtype, torch.float32)  # log-softmax in >= float32
    first_logits = first.logits.to(wide)[record]  # [N, V]: predicts each row's first answer token
    rest = rest.logits.to(wide)  # [N_k, V]
    token_logps = torch.zeros(answer_ids.shape, dtype=wide, device=rest.device)
    token_logps[:, 0] = first_logits.gather(-1, answer_ids[:, :1]).squeeze(-1) - first_logits.logsumexp(-1)
    later = torch.zeros_like(answer_mask)
    later[:, 1:] = answer_mask[:, 1:]
    picked = rest.gather(-1, answer_ids[later].unsqueeze(-1)).squeeze(-1) - rest.logsumexp(-1)
    return token_logps.masked_scatter(later, picked) * answer_mask, answer_mask


def _per_record(token_logps: Tensor, answer_mask: Tensor, record: Tensor, slot: Tensor) -> PreferenceForward:
    """Scatter N answer rows into [R] chosen and [R, K] rejected tensors."""
    logps = token_logps.sum(dim=1)
    lengths = answer_mask.sum(dim=1).to(logps.dtype)
    n_records, k = int(record.max()) + 1, int(slot.max())
    if k < 1:
        raise ValueError("a preference batch needs at least one rejected answer")
    is_chosen = slot == 0
    order = record[is_chosen].argsort()
    rej = ~is_chosen
    rejected_logps = logps.new_zeros(n_records, k).index_put((record[rej], slot[rej] - 1), logps[rej])
    rejected_lengths = logps.new_zeros(n_records, k).index_put((record[rej], slot[rej] - 1), lengths[rej])
    return PreferenceForward(
        logps[is_chosen][order], rejected_logps, rejected_lengths > 0, lengths[is_chosen][order], rejected_lengths,
        token_logps[is_chosen][order], answer_mask[is_chosen][order],
    )
