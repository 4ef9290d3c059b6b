"""Answer log-probs: parity with a naive full-logits computation, row placement, batch independence."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from mmalign.data.collate import collate_preference
from mmalign.data.schema import PreferenceRecord
from mmalign.models.logprobs import (
    answer_cache_key, answer_token_logps, append_logps_cache, cached_reference, live_reference, load_logps_cache,
    model_inputs, preference_forward, sequence_logps,
)
from mmalign.models.tiny import build_tiny_vlm

RECORDS = [
    PreferenceRecord("a", ["a.png"], "<image>\nDescribe the image.", "There is a red circle.",
                     ["There is a blue square.", "There is a green star and a red circle."]),
    PreferenceRecord("b", ["b.png"], "<image>\nIs there a red circle in the image?", "Yes.", ["No."]),
]
IMAGES = [[Image.new("RGB", (32, 32), (200, 30, 30))], [Image.new("RGB", (40, 48), (20, 20, 220))]]


def _naive_sequence_logps(model, batch) -> torch.Tensor:
    """Full [N, T, V] logits, shift by one, gather the labels: the textbook computation."""
    logits = model(**model_inputs(batch)).logits.float()
    labels = batch["labels"][:, 1:]
    mask = labels != -100
    token = logits[:, :-1].log_softmax(-1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (token * mask).sum(-1)


@pytest.fixture(scope="module", params=["llava", "gemma3"])
def tiny(request):
    torch.manual_seed(0)
    return build_tiny_vlm(request.param, seed=1)


def test_parity_with_full_logits_and_row_placement(tiny):
    model, processor = tiny
    batch = collate_preference(processor, RECORDS, IMAGES, max_length=512)
    with torch.no_grad():
        out = preference_forward(model, batch)
        naive = _naive_sequence_logps(model, batch)
    # rows: a/chosen, a/rej1, a/rej2, b/chosen, b/rej1
    torch.testing.assert_close(out.chosen_logps, naive[[0, 3]], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.rejected_logps[0], naive[[1, 2]], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.rejected_logps[1, 0], naive[4], atol=1e-5, rtol=1e-5)
    assert out.rejected_mask.tolist() == [[True, True], [True, False]]
    assert out.rejected_logps[1, 1].item() == 0.0
    tok = processor.tokenizer
    n_tokens = [len(tok(a, add_special_tokens=False)["input_ids"]) + 1 for a in ("There is a red circle.", "Yes.")]
    assert out.chosen_lengths.tolist() == n_tokens
    assert out.chosen_mask.sum(-1).tolist() == n_tokens
    torch.testing.assert_close(sequence_logps(out.chosen_token_logps, out.chosen_mask), out.chosen_logps)
    assert bool((out.chosen_logps < 0).all())


def test_row_logps_do_not_depend_on_the_rest_of_the_batch(tiny):
    model, processor = tiny
    with torch.no_grad():
        both = preference_forward(model, collate_preference(processor, RECORDS, IMAGES, max_length=512))
        alone = preference_forward(model, collate_preference(processor, RECORDS[1:], IMAGES[1:], max_length=512))
    torch.testing.assert_close(alone.chosen_logps[0], both.chosen_logps[1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(alone.rejected_logps[0, 0], both.rejected_logps[1, 0], atol=1e-5, rtol=1e-5)


def test_gradients_reach_the_model(tiny):
    model, processor = tiny
    batch = collate_preference(processor, RECORDS[:1], IMAGES[:1], max_length=512)
    token_logps, mask = answer_token_logps(model, batch)
    sequence_logps(token_logps, mask).sum().backward()
    grads = [p.grad for p in model.get_decoder().parameters() if p.grad is not None]
    assert grads and any(float(g.abs().sum()) > 0 for g in grads)
    model.zero_grad(set_to_none=True)


def test_answer_at_position_zero_is_refused(tiny):
    model, processor = tiny
    batch = collate_preference(processor, RECORDS[:1], IMAGES[:1], max_length=512)
    batch["labels"][0, 0] = 5
    with pytest.raises(ValueError, match="position 0"):
        answer_token_logps(model, batch)


def test_logps_cache_round_trip_and_torn_last_line(tmp_path):
    path = tmp_path / "cache" / "ref.jsonl"
    assert load_logps_cache(path) == {}
    append_logps_cache(path, {"a": -1.5, "b": -2.25})
    append_logps_cache(path, {"c": -3.0})
    assert load_logps_cache(path) == {"a": -1.5, "b": -2.25, "c": -3.0}
    with path.open("a") as fh:
        fh.write('{"key": "d", "lo')  # a writer killed mid-line
    assert load_logps_cache(path) == {"a": -1.5, "b": -2.25, "c": -3.0}
    path.write_text('{"key": "a", "logps": NaN}\n')
    with pytest.raises(ValueError, match="ref.jsonl:1"):
        load_logps_cache(path)


def test_cache_key_depends_on_every_input():
    base = answer_cache_key("model", ["img"], "<image>\nQ?", "A.")
    variants = [answer_cache_key("model2", ["img"], "<image>\nQ?", "A."),
                answer_cache_key("model", ["img2"], "<image>\nQ?", "A."),
                answer_cache_key("model", ["img"], "<image>\nQ2?", "A."),
                answer_cache_key("model", ["img"], "<image>\nQ?", "B.")]
    assert len({base, *variants}) == 5
    assert base == answer_cache_key("model", ["img"], "<image>\nQ?", "A.")


def test_cached_reference_equals_live_reference(tiny, tmp_path):
    from accelerate import PartialState

    model, processor = tiny
    live = live_reference(model, model)  # a frozen model is its own reference
    batch = collate_preference(processor, RECORDS, IMAGES, max_length=512)
    keys = [[f"{r.id}/{j}" for j in range(1 + len(r.rejected))] for r in RECORDS]
    calls = []

    def compute(indices):
        calls.append(indices)
        sub = collate_preference(processor, [RECORDS[i] for i in indices], [IMAGES[i] for i in indices], 512)
        return live(sub, indices)

    cached = cached_reference(keys, tmp_path / "ref.jsonl", compute, PartialState(), batch_size=1)
    assert calls == [[0], [1]]
    want, got = live(batch, [0, 1]), cached(batch, [0, 1])
    torch.testing.assert_close(got[0], want[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[1], want[1], atol=1e-5, rtol=1e-5)
    cached_reference(keys, tmp_path / "ref.jsonl", compute, PartialState(), batch_size=1)
    assert calls == [[0], [1]]  # second time: all hits


def test_references_in_the_shared_prefix_layout(tiny, tmp_path):
    """A live reference in the packed layout equals the plain one; the cache serves any layout's batch,
    sized by the records it holds (record b alone: one rejected slot)."""
    from accelerate import PartialState

    from mmalign.data.packing import collate_shared_prefix
    from mmalign.models.shared_prefix import shared_prefix_forward

    model, processor = tiny
    plain = live_reference(model, model)(collate_preference(processor, RECORDS, IMAGES), [0, 1])
    shared = live_reference(model, model, shared_prefix_forward)
    packed = collate_shared_prefix(processor, RECORDS, IMAGES)
    got = shared(packed, [0, 1])
    torch.testing.assert_close(got[0], plain[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[1], plain[1], atol=1e-5, rtol=1e-5)
    keys = [[f"{r.id}/{j}" for j in range(1 + len(r.rejected))] for r in RECORDS]
    cached = cached_reference(keys, tmp_path / "ref.jsonl", lambda idx: shared(
        collate_shared_prefix(processor, [RECORDS[i] for i in idx], [IMAGES[i] for i in idx]), idx), PartialState(), 2)
    chosen, rejected = cached(collate_shared_prefix(processor, RECORDS[1:], IMAGES[1:]), [1])
    assert rejected.shape == (1, 1)
    torch.testing.assert_close(chosen, plain[0][1:], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(rejected, plain[1][1:, :1], atol=1e-5, rtol=1e-5)
