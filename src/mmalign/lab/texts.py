"""Every text of the lab in one place: prompts, caption and yes/no templates, the CHAIR vocabulary.

Captions list objects in reading order except that a bias partner comes **directly after its trigger**
(lab notes: this order is what lets a model's language prior name an absent partner) in the share
``WorldConfig.partner_order_rate`` of captions (default half; ``mmalign.lab.splits.caption_text``). Answers to
yes/no questions start with "Yes"/"No" so POPE answer parsing works.
"""

from __future__ import annotations

from mmalign.lab.world import COLOURS, SHAPES, all_objects

IMAGE_MARK = "<image>\n"
CAPTION_PROMPT = IMAGE_MARK + "Describe the image."
QUESTION_TEMPLATE = "<image>\nIs there a {obj} in the image?"
YES, NO = "Yes.", "No."
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: "
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}<image>\n"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}"
    "{% else %} ASSISTANT: {% for c in message['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}"
    "{% endif %}{% endfor %}</s>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %} ASSISTANT:{% endif %}"
)


def question_prompt(obj: str) -> str:
    return QUESTION_TEMPLATE.format(obj=obj)


def caption_order(names: list[str], partner_of: dict[str, str]) -> list[str]:
    """Reading-order ``names`` with each present partner moved directly after its trigger."""
    partners = {partner_of[n] for n in names if n in partner_of and partner_of[n] in names}
    ordered: list[str] = []
    for name in names:
        if name in partners:
            continue
        ordered.append(name)
        if name in partner_of and partner_of[name] in partners:
            ordered.append(partner_of[name])
    return ordered


def caption(ordered: list[str]) -> str:
    """``["red circle", "blue square", "green cross"]`` -> "There is a red circle, a blue square and a green cross." """
    items = [f"a {name}" for name in ordered]
    listed = items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]
    return f"There is {listed}."


def plural(name: str) -> str:
    """English plural of an object name: "red cross" -> "red crosses", "blue circle" -> "blue circles"."""
    return name + ("es" if name.endswith(("s", "x", "z", "ch", "sh")) else "s")


def synonyms() -> list[list[str]]:
    """CHAIR vocabulary: one row per object class, canonical name first, then its plural."""
    return [[name, plural(name)] for name in all_objects()]


def corpus() -> list[str]:
    """Every word the lab ever writes; the tokenizer is trained on it so nothing maps to <unk>."""
    words = [CAPTION_PROMPT, question_prompt("red circle"), YES, NO, "There is a , and ."]
    words += list(COLOURS) + list(SHAPES) + [plural(s) for s in SHAPES] + ["USER", "ASSISTANT", ":"]
    return words
