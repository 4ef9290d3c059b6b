"""RL rollouts at token level: exact sampled ids (never the image placeholder), per-token log-probs equal in both
layouts and to a naive full-logits forward, critic values per answer position, and sample_experience (policy and
reference agree at step 0, rows in prompt groups, the reward's scores)."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from mmalign.data.chat import answer_ids
from mmalign.data.rollout_batches import collate_rollouts_plain
from mmalign.data.schema import PreferenceRecord
from mmalign.models.heads import ScalarHeadModel
from mmalign.models.image_tokens import image_token_id
from mmalign.models.logprobs import model_inputs
from mmalign.models.lora import LoraConfig, add_lora
from mmalign.models.rollout_forward import ROLLOUT_LAYOUTS, rollout_logps, token_values
from mmalign.sampling.generate import GenerationParams, generate, generate_ids
from mmalign.sampling.rollouts import RolloutConfig, sample_experience

PROMPTS = ["<image>\nDescribe the image.", "<image>\nIs there a red circle in the image?"]
IMAGES = [[Image.new("RGB", (32, 32), (200, 30, 30))], [Image.new("RGB", (64, 32), (20, 20, 220))]]
TEXTS = ["There is a red circle.", "A", "No, there is a blue star and a green heart.", "Yes."]  # 2 per prompt
GROUP = [0, 0, 1, 1]


def _answers(processor) -> list[list[int]]:
    """Token ids of the answers; the second one has no EOS (a rollout that ran out of tokens)."""
    ids = [answer_ids(processor.tokenizer, t) for t in TEXTS]
    return [ids[0], ids[1][:-1], ids[2], ids[3]]


def _naive(model, batch) -> list[torch.Tensor]:
    """Per answer, its tokens' log-probs from full [N, T, V] logits of a plain batch."""
    logits = model(**model_inputs(batch), use_cache=False).logits.double()
    labels = batch["labels"]
    out = []
    for n in range(len(labels)):
        positions = (labels[n] != -100).nonzero().squeeze(-1)
        logp = logits[n, positions - 1].log_softmax(-1)
        out.append(logp.gather(-1, labels[n, positions].unsqueeze(-1)).squeeze(-1))
    return out


@pytest.mark.parametrize("family", ["llava", "llava_next", "qwen2_vl"])
def test_both_layouts_give_the_naive_token_logps(tiny_vlm, family):
    model, processor = tiny_vlm(family)
    model, answers = model.double(), _answers(processor)
    naive = _naive(model, collate_rollouts_plain(processor, PROMPTS, IMAGES, answers, GROUP))
    for layout in ROLLOUT_LAYOUTS:
        logps, mask = rollout_logps(model, processor, PROMPTS, IMAGES, answers, GROUP, layout, "cpu")
        assert mask.sum(-1).tolist() == [len(a) for a in answers]
        for n, expected in enumerate(naive):
            # the plain forward's log-softmax runs in float32
            torch.testing.assert_close(logps[n, : len(expected)].double(), expected, atol=1e-6, rtol=1e-6)
            assert logps[n, len(expected):].abs().sum() == 0


def test_token_values_are_the_head_on_the_state_before_each_answer_token(tiny_vlm):
    model, processor = tiny_vlm("llava")
    critic = ScalarHeadModel(model.double()).double()
    batch = collate_rollouts_plain(processor, PROMPTS, IMAGES, _answers(processor), GROUP)
    values = token_values(critic, batch)
    hidden = critic.backbone(**model_inputs(batch), output_hidden_states=True, use_cache=False).hidden_states[-1]
    for n, answer in enumerate(_answers(processor)):
        positions = (batch["labels"][n] != -100).nonzero().squeeze(-1) - 1
        expected = critic.head(hidden[n, positions]).squeeze(-1).float()
        torch.testing.assert_close(values[n, : len(answer)], expected)
        assert values[n, len(answer):].abs().sum() == 0


def test_generate_ids_are_the_decoded_answers_and_never_the_image_token(tiny_vlm):
    model, processor = tiny_vlm("llava")
    params = GenerationParams(max_new_tokens=8)
    ids = generate_ids(model, processor, PROMPTS, IMAGES, params, seed=3)
    eos = model.generation_config.eos_token_id
    assert all(a[-1] == eos or len(a) == 8 for a in ids) and all(eos not in a[:-1] for a in ids)
    texts = [t.strip() for t in processor.tokenizer.batch_decode(ids, skip_special_tokens=True)]
    assert texts == generate(model, processor, PROMPTS, IMAGES, params, seed=3)
    image = image_token_id(model.config)
    with torch.no_grad():  # make the image placeholder the most likely next token everywhere
        model.get_output_embeddings().weight[image] *= 0
        model.get_output_embeddings().weight[image] += 50 * model.get_output_embeddings().weight.std()
    sampled = generate_ids(model, processor, PROMPTS, IMAGES, GenerationParams(8, temperature=1.0), seed=3)
    assert all(image not in a for a in sampled)


def _records() -> list[PreferenceRecord]:
    return [PreferenceRecord(f"r{i}", ["x.png"], p, "A red circle.", []) for i, p in enumerate(PROMPTS)]


def test_sample_experience_at_step_zero_has_policy_equal_to_reference(tiny_vlm):
    model, processor = tiny_vlm("llava")
    policy = add_lora(model, LoraConfig(rank=4, alpha=8, target_modules=["q_proj", "v_proj"]), [])[0]
    cfg = RolloutConfig(k=3, max_new_tokens=6, batch_size=4)

    def reward(groups):
        return [[-float(len(a)) for a in g.answers] for g in groups]

    exp = sample_experience(policy, None, processor, _records(), IMAGES, cfg, reward, seed=0, step=1,
                            layout="prefix_cache", device="cpu")
    tokens = exp.tokens
    assert tokens.group.tolist() == [0, 0, 0, 1, 1, 1] and len(exp.rollouts) == 2
    assert torch.equal(tokens.policy_token_logps, tokens.ref_token_logps)  # LoRA B = 0: the KL is exactly 0
    assert tokens.scores.tolist() == [-float(len(a)) for r in exp.rollouts for a in r.answers]
    assert exp.rollouts[0].verdict["scores"] == tokens.scores[:3].tolist() and set(exp.seconds) == {
        "generate", "score", "logps"}
    answers = [ids[m].tolist() for ids, m in zip(tokens.answer_ids, tokens.answer_mask)]
    again, _ = rollout_logps(policy, processor, PROMPTS, IMAGES, answers, tokens.group.tolist(), "plain", "cpu")
    torch.testing.assert_close(again, tokens.policy_token_logps[:, : again.shape[1]], atol=1e-5, rtol=1e-5)
    assert (tokens.policy_token_logps[~tokens.answer_mask] == 0).all()


@pytest.mark.parametrize("family", ["llava", "llava_next", "qwen2_vl"])
def test_k_copies_from_one_prefill_equal_the_repeated_prompts(tiny_vlm, family):
    """llava / llava_next: each prompt prefilled once and decoded k times; qwen2_vl (mRoPE): each copy on its own."""
    model, processor = tiny_vlm(family)
    repeated_prompts, repeated_images = [p for p in PROMPTS for _ in range(3)], [i for i in IMAGES for _ in range(3)]
    for params in (GenerationParams(max_new_tokens=8), GenerationParams(max_new_tokens=8, temperature=1.0)):
        shared = generate_ids(model, processor, PROMPTS, IMAGES, params, seed=5, batch_size=6, copies=3)
        plain = generate_ids(model, processor, repeated_prompts, repeated_images, params, seed=5, batch_size=6)
        assert shared == plain and len(shared) == 6
