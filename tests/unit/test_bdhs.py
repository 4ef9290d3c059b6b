"""BDHS (Algorithm 1): the batched sampler equals a naive one-sentence-at-a-time reference, and a record's
result does not depend on batch size, order or the other records."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mmalign.config import load_config
from mmalign.data.chat import render_prompt
from mmalign.data.record_files import record_to_json
from mmalign.data.schema import PreferenceRecord, check_fields
from mmalign.sampling.bdhs import BDHSConfig, BDHSResult, bdhs_record, bdhs_sample
from mmalign.sampling.bdhs_run import BDHSRunConfig
from mmalign.sampling.guidance import YES_NO, record_rng, split_sentences, swap_yes_no
from mmalign.sampling.masked import MaskedRow, generate_masked, image_token_counts
from mmalign.sampling.povid import noised_image
from mmalign.sampling.sentences import first_sentence, sentence_ends

REFERENCES = [
    "There is a red circle and a blue square. Yes it is.",
    "No.",
    "There is a green star. There is a purple heart. The star is on the left.",
    "Yes, there is a red circle in the image.",
]


def _records() -> tuple[list[PreferenceRecord], list[list[Image.Image]]]:
    records, images = [], []
    for i, ref in enumerate(REFERENCES):
        prompt = "<image>\nDescribe the image." if i % 2 == 0 else "<image>\nIs there a red circle in the image?"
        records.append(PreferenceRecord(f"rec-{i}", [f"{i}.png"], prompt, ref, ["There is nothing."] if i == 3 else []))
        pixels = np.random.default_rng(i).integers(0, 256, (32, 32 + 32 * (i % 2), 3), dtype=np.uint8)
        images.append([Image.fromarray(pixels)])
    return records, images


def fake_similarity(texts, references):
    """Deterministic stand-in for the embedding model: 'similar' for about half of the answers, so that
    records are accepted at different iterations."""
    return np.array([0.99 if hashlib.sha256(t.encode()).digest()[0] % 2 else 0.5 for t in texts])


def _naive_generate(model, processor, prompt, images, keep, prefix, max_new_tokens, stop_at_sentence_end):
    """One row alone: prompt + prefix tokens, image tokens hidden, positions 0..T-1, greedy generate; returns the
    continuation and whether it ran out of tokens (no EOS, and no sentence end when stopping at one)."""
    text = render_prompt(processor, prompt, len(images))
    inputs = dict(processor(text=[text], images=[images], return_tensors="pt"))
    prefix_ids = processor.tokenizer(prefix, add_special_tokens=False)["input_ids"] if prefix else []
    ids = torch.cat([inputs.pop("input_ids"), torch.tensor([prefix_ids], dtype=torch.long)], dim=1)
    attention = torch.ones_like(ids)
    image_positions = torch.nonzero(ids[0] == model.config.image_token_id).squeeze(-1)
    attention[0, image_positions[torch.from_numpy(~keep)]] = 0
    inputs.pop("attention_mask")
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=attention, position_ids=torch.arange(ids.shape[1])[None],
                             max_new_tokens=max_new_tokens, do_sample=False, **inputs)
    tok = processor.tokenizer
    head = tok.decode(prefix_ids, skip_special_tokens=True)
    full = tok.decode(prefix_ids + out[0, ids.shape[1]:].tolist(), skip_special_tokens=True)
    assert full.startswith(head)
    cont = full[len(head):]
    new_ids = out[0, ids.shape[1]:].tolist()
    ended = model.generation_config.eos_token_id in new_ids or (
        stop_at_sentence_end and bool(sentence_ends(cont, at_start=False)))
    return (first_sentence(cont) if stop_at_sentence_end else cont), not ended


def naive_bdhs(model, processor, record, images, cfg, similarity):
    """Algorithm 1 as written: per iteration draw the mask, then one sentence at a time swap, pivot, generate."""
    n_tokens = image_token_counts(model, processor, [record.prompt], [images])[0]
    for i in range(1, cfg.n_iter + 1):
        rng = record_rng(cfg.seed, record.id, i)
        keep = rng.random(n_tokens) >= cfg.rho
        noise_seed = int(rng.integers(2**63))
        imgs = [noised_image(im, cfg.noise_steps, noise_seed + j) for j, im in enumerate(images)] \
            if cfg.noise_steps else images
        if cfg.n_iter > 1 and i == cfg.n_iter:
            rng.integers(2**63)
            answer, truncated = _naive_generate(model, processor, record.prompt, imgs, keep, "",
                                                cfg.max_answer_tokens, False)
            answer = answer.strip()
            return BDHSResult(record.id, answer, i, float(similarity([answer], [record.chosen])[0]), True, truncated,
                              int(keep.sum()), n_tokens)
        y_neg, context, truncated = "", "", False
        for sentence, sep in split_sentences(record.chosen):
            s = sentence
            swapped = bool(YES_NO.match(s)) and rng.random() >= 0.5
            if swapped:
                s = swap_yes_no(s)
            words = s.split()
            if len(words) >= 2:
                cut = int(rng.integers(1, len(words)))
                pre = s[: s.index(words[cut - 1], len(" ".join(words[: cut - 1]))) + len(words[cut - 1])]
                generate = True
            else:
                pre, generate = (s, False) if swapped else ("", True)
            rng.integers(2**63)
            cont, cut = _naive_generate(model, processor, record.prompt, imgs, keep, context + pre,
                                        cfg.max_sentence_tokens, True) if generate else ("", False)
            truncated = truncated or cut
            y_neg += pre + cont + sep
            context += sentence + sep
        y_neg = y_neg.strip()
        phi = float(similarity([y_neg], [record.chosen])[0])
        if phi < cfg.similarity_threshold or i == cfg.n_iter:
            return BDHSResult(record.id, y_neg, i, phi, False, truncated, int(keep.sum()), n_tokens)
    raise AssertionError("unreachable: the last iteration always returns")


@pytest.mark.parametrize("family, rho, noise_steps", [("llava", 0.5, 0), ("llava", 0.0, 500), ("llava_next", 0.9, 0)])
def test_batched_sampler_equals_naive_algorithm_1(tiny_vlm, family, rho, noise_steps):
    model, processor = tiny_vlm(family)
    records, images = _records()
    cfg = BDHSConfig(rho=rho, noise_steps=noise_steps, n_iter=3, max_sentence_tokens=6, max_answer_tokens=8, seed=4)
    fast = bdhs_sample(model, processor, records, images, cfg, fake_similarity)
    naive = [naive_bdhs(model, processor, r, im, cfg, fake_similarity) for r, im in zip(records, images)]
    assert fast == naive
    assert {r.iteration for r in fast} != {1}  # the filter made some records resample
    assert all(0 <= r.visible_tokens <= r.image_tokens > 0 for r in fast)
    assert all(r.answer for r in fast)


def test_result_independent_of_batch_and_order(tiny_vlm):
    model, processor = tiny_vlm("llava")
    records, images = _records()
    cfg = BDHSConfig(n_iter=3, max_sentence_tokens=6, max_answer_tokens=8)
    together = bdhs_sample(model, processor, records, images, cfg, fake_similarity)
    order = [2, 0, 3, 1]
    alone = [bdhs_sample(model, processor, [records[i]], [images[i]], cfg, fake_similarity)[0] for i in order]
    assert {r.id: r for r in together} == {r.id: r for r in alone}
    other_seed = bdhs_sample(model, processor, records, images, BDHSConfig(n_iter=3, max_sentence_tokens=6,
                                                                           max_answer_tokens=8, seed=1), fake_similarity)
    assert [r.answer for r in other_seed] != [r.answer for r in together]


def test_sampled_rows_do_not_depend_on_their_batch(tiny_vlm):
    model, processor = tiny_vlm("llava")
    records, images = _records()
    counts = image_token_counts(model, processor, [r.prompt for r in records], images)
    rows = [MaskedRow(r.prompt, im, "There is", np.ones(n, bool), 100 + i)
            for i, (r, im, n) in enumerate(zip(records, images, counts))]
    kwargs = dict(max_new_tokens=8, temperature=1.0, stop_at_sentence_end=False)
    together = generate_masked(model, processor, rows, **kwargs)
    alone = [generate_masked(model, processor, [row], **kwargs)[0] for row in rows]
    assert together == alone
    greedy = generate_masked(model, processor, rows, max_new_tokens=8, temperature=0.0, stop_at_sentence_end=False)
    assert greedy != together


def test_bdhs_record_keeps_existing_rejected_and_appends_the_answer():
    records, _ = _records()
    result = BDHSResult("rec-3", "No, there is a blue star.", 2, 0.81, False)
    out = bdhs_record(records[3], result, BDHSConfig())
    assert out.rejected == ["There is nothing.", "No, there is a blue star."]  # Eq. 5 order: external, then policy
    assert (out.id, out.source) == (records[3].id, records[3].source)
    online = bdhs_record(records[3], result, BDHSConfig(), record_id="rec-3@7", source="online_bdhs")
    assert (online.id, online.source, online.rejected) == ("rec-3@7", "online_bdhs", out.rejected)
    assert out.chosen == records[3].chosen and out.images == records[3].images
    assert out.meta["bdhs"]["iteration"] == 2 and out.meta["bdhs"]["similarity"] == 0.81
    assert (out.meta["bdhs"]["visible_tokens"], out.meta["bdhs"]["image_tokens"]) == (-1, -1)  # not given
    assert out.meta["bdhs"]["rho"] == 0.99 and "batch_size" not in out.meta["bdhs"]
    check_fields(record_to_json(out))


def test_records_without_images_are_refused(tiny_vlm):
    model, processor = tiny_vlm("llava")
    record = PreferenceRecord("text-only", [], "Describe a circle.", "It is round.", [])
    with pytest.raises(ValueError, match="record 'text-only': BDHS masks image tokens and needs at least one image"):
        bdhs_sample(model, processor, [record], [[]], BDHSConfig(), fake_similarity)


@pytest.mark.parametrize("name, rho, noise_steps", [("bdhs_lab.yaml", 0.99, 0), ("bdhs_noise_lab.yaml", 0.0, 500)])
def test_shipped_configs_load(name, rho, noise_steps):
    cfg = load_config(BDHSRunConfig, Path(__file__).parents[2] / "configs" / name, ["model=elsewhere"])
    assert (cfg.bdhs.rho, cfg.bdhs.noise_steps, cfg.bdhs.n_iter, cfg.model) == (rho, noise_steps, 5, "elsewhere")


def test_unguided_ablation_and_truncation_are_reported(tiny_vlm):
    model, processor = tiny_vlm("llava")
    records, images = _records()
    # Table 15 "masking without guidance": every iteration generates the whole answer under the mask.
    cfg = BDHSConfig(n_iter=3, guided=False, max_answer_tokens=2, seed=4)
    results = bdhs_sample(model, processor, records, images, cfg, fake_similarity)
    assert all(r.unguided for r in results)
    # With a budget of 2 tokens the random tiny model never reaches EOS: each answer is flagged, not cut silently.
    assert all(r.truncated for r in results)
    roomy = bdhs_sample(model, processor, records, images, BDHSConfig(n_iter=1, guided=False, max_answer_tokens=12,
                                                                      seed=4), fake_similarity)
    assert [r.answer[: len(c.answer)] for r, c in zip(roomy, results) if c.iteration == 1] == [
        c.answer for c in results if c.iteration == 1]  # the budget only cut the same greedy answer short
