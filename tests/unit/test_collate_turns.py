"""Multi-turn SFT rows (``collate_turns``): every assistant answer of a conversation is labelled in one row
whose tokens before each answer are, token for token, the row the model sees when it generates that turn, so
the packed row's per-turn log-probs equal those of the single-turn rows (float64, every family, two images)."""

import copy

import pytest
import torch
from PIL import Image

from mmalign.data.chat import answer_ids
from mmalign.data.collate import IGNORE_INDEX, SequenceTooLong, collate_sft, collate_turns
from mmalign.data.schema import FieldError, PreferenceRecord, check_fields
from mmalign.models.logprobs import answer_token_logps
from mmalign.models.tiny import FAMILIES
from mmalign.trainers.sft import answer_tokens

ANSWERS = ["Yes.", "There is a blue square and a red circle.", "There are two."]
MESSAGES = [
    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Is there a red circle in the image?"}]},
    {"role": "assistant", "content": ANSWERS[0]},
    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is shown in the picture?"}]},
    {"role": "assistant", "content": [{"type": "text", "text": ANSWERS[1]}]},
    {"role": "user", "content": "How many objects are there?"},
]
# (messages up to the user turn of answer k, images shown by then)
TURNS = [(1, 1), (3, 2), (5, 2)]


def _images():
    return [Image.new("RGB", (32, 32), (200, 30, 30)), Image.new("RGB", (40, 32), (30, 30, 200))]


def _conversation(prompt=MESSAGES, chosen=ANSWERS[-1], rid="conv"):
    return PreferenceRecord(rid, ["a.png", "b.png"], prompt, chosen, [])


def _per_token(batch):
    return {k: v for k, v in batch.items() if isinstance(v, torch.Tensor) and v.shape == batch["input_ids"].shape}


@pytest.mark.parametrize("family", FAMILIES)
def test_packed_turns_equal_the_single_turn_rows(tiny_vlm, family):
    model, processor = tiny_vlm(family)
    model = model.double().eval()
    images = _images()
    packed = collate_turns(processor, [_conversation()], [images])
    labels = packed["labels"][0]
    assert labels[labels != IGNORE_INDEX].tolist() == sum((answer_ids(processor.tokenizer, a) for a in ANSWERS), [])
    with torch.no_grad():
        token_logps, mask = answer_token_logps(model, packed)
    assert int(mask.sum()) == answer_tokens(processor.tokenizer, _conversation())
    covered = torch.zeros_like(mask[0])
    for answer, (cut, n_images) in zip(ANSWERS, TURNS):
        single = collate_sft(processor, [PreferenceRecord("t", ["a.png"] * n_images, MESSAGES[:cut], answer, [])],
                             [images[:n_images]])
        width = single["input_ids"].shape[1]
        for key, values in _per_token(single).items():  # input_ids, Gemma3 / Qwen token types ...
            if key != "labels":
                assert torch.equal(packed[key][0, :width], values[0]), key
        turn = single["labels"][0] != IGNORE_INDEX
        assert torch.equal(labels[:width][turn], single["labels"][0][turn])
        with torch.no_grad():
            alone, _ = answer_token_logps(model, single)
        torch.testing.assert_close(token_logps[0, :width][turn], alone[0][turn], rtol=0, atol=1e-10)
        covered[:width] |= turn
    assert torch.equal(covered, mask[0])  # the labels are exactly the three answers


RECORDS = [
    PreferenceRecord(id="a", images=["x.png"], prompt="<image>\nWhat is shown?", chosen="a red circle", rejected=[]),
    PreferenceRecord(id="b", images=["y.png"], prompt=[{"role": "user", "content": [
        {"type": "image"}, {"type": "text", "text": "Is there a dog?"}]}], chosen="no", rejected=[]),
]


@pytest.mark.parametrize("family", FAMILIES)
def test_single_turn_records_collate_as_collate_sft(tiny_vlm, family):
    _, processor = tiny_vlm(family)
    images = [[Image.new("RGB", (40, 32), (250, 0, 0))], [Image.new("RGB", (32, 32), (0, 0, 250))]]
    turns, plain = collate_turns(processor, RECORDS, images), collate_sft(processor, RECORDS, images)
    assert turns.keys() == plain.keys()
    for key in plain:
        assert torch.equal(turns[key], plain[key]), key


def test_batched_conversations_score_as_if_alone(tiny_vlm):
    """Right padding keeps a conversation's log-probs independent of the rows beside it."""
    model, processor = tiny_vlm("qwen2_vl")
    model = model.double().eval()
    short = PreferenceRecord("s", ["a.png"], "<image>\nWhat is shown?", "a red circle", [])
    images = [_images(), [Image.new("RGB", (32, 32), (0, 200, 0))]]
    batch = collate_turns(processor, [_conversation(), short], images)
    with torch.no_grad():
        together, mask = answer_token_logps(model, batch)
        alone, alone_mask = answer_token_logps(model, collate_turns(processor, [_conversation()], images[:1]))
    torch.testing.assert_close(together[0][mask[0]], alone[0][alone_mask[0]], rtol=0, atol=1e-10)


def _with_template(processor, template):
    processor = copy.deepcopy(processor)  # the fixture's processor is shared
    processor.chat_template = template
    return processor


# past answers rendered as "ASSISTANT: <text> " (a space, no EOS) while the generation prompt is "ASSISTANT:"
SPACED = ("<s>{% for m in messages %}{% if m['role'] == 'user' %}USER: {% for c in m['content'] %}"
          "{% if c['type'] == 'image' %}<image>\n{% else %}{{ c['text'] }}{% endif %}{% endfor %} "
          "{% else %}ASSISTANT: {{ m['content'] }} {% endif %}{% endfor %}"
          "{% if add_generation_prompt %}ASSISTANT:{% endif %}")


def test_a_template_rendering_past_answers_its_own_way_gets_the_turn_by_turn_row(tiny_vlm):
    """The model's own answer (text + EOS) stands in for the template's rendering of it; the next user turn
    follows as the template writes it."""
    _, processor = tiny_vlm("llava")
    processor = _with_template(processor, SPACED)
    last = {"role": "user", "content": [{"type": "text", "text": MESSAGES[4]["content"]}]}
    messages = [MESSAGES[0], MESSAGES[1], last]
    record = PreferenceRecord("spaced", ["a.png"], messages, ANSWERS[-1], [])
    image = _images()[:1]
    row = collate_turns(processor, [record], [image])["input_ids"][0].tolist()
    tok = processor.tokenizer
    first = processor(images=[image], text=["<s>USER: <image>\nIs there a red circle in the image? ASSISTANT:"],
                      return_tensors="pt")["input_ids"][0].tolist()
    second = tok("USER: How many objects are there? ASSISTANT:", add_special_tokens=False)["input_ids"]
    assert row == first + answer_ids(tok, ANSWERS[0]) + second + answer_ids(tok, ANSWERS[-1])


def test_a_template_that_rewrites_history_is_refused_with_the_record_id(tiny_vlm):
    _, processor = tiny_vlm("llava")
    processor = _with_template(processor, "{{ messages | length }}" + SPACED)
    with pytest.raises(ValueError, match="record 'conv': the chat template renders the conversation before answer 2"):
        collate_turns(processor, [_conversation()], [_images()])


def test_too_long_conversations_are_refused_with_the_record_id(tiny_vlm):
    _, processor = tiny_vlm("llava")
    n = sum(len(answer_ids(processor.tokenizer, a)) for a in ANSWERS)
    expected = f"record 'conv': prompt .* \\+ answers \\({n} tokens\\).*> max_length 40"
    with pytest.raises(SequenceTooLong, match=expected):
        collate_turns(processor, [_conversation()], [_images()], max_length=40)


@pytest.mark.parametrize("messages, field, reason", [
    ([MESSAGES[1], MESSAGES[0]], "prompt[0].role", "an assistant turn must follow a user turn"),
    ([MESSAGES[0], MESSAGES[1], MESSAGES[1], MESSAGES[4]], "prompt[2].role", "must follow a user turn"),
    ([{"role": "system", "content": "Be brief."}, MESSAGES[1], MESSAGES[0]], "prompt[1].role", "must follow"),
    ([MESSAGES[0], {"role": "assistant", "content": [{"type": "image"}]}, MESSAGES[4]], "prompt[1].content",
     "an assistant turn holds text only"),
])
def test_assistant_turns_are_checked(messages, field, reason):
    n_images = sum(1 for m in messages if isinstance(m["content"], list) for c in m["content"] if c["type"] == "image")
    raw = {"id": "r", "images": ["a.png"] * n_images, "prompt": messages, "chosen": "x", "rejected": []}
    with pytest.raises(FieldError, match=reason) as err:
        check_fields(raw)
    assert err.value.field == field
