"""Prompt rendering shared by every stage: one record prompt -> the model's chat-formatted text.

A record's ``prompt`` is either plain text (``"<image>\\nWhat is shown?"``; each ``<image>`` marks where an
image goes, and images without a marker go first) or a list of chat messages in the Hugging Face format
(``{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "..."}]}``).
Rendering goes through the processor's own chat template, so the same record trains LLaVA, Qwen2-VL or
Idefics3 with each model's native format. Answers are tokenized apart from the prompt (see
``answer_ids``) so prompt/answer boundaries are exact for every tokenizer. A message prompt may hold earlier
assistant turns (a multi-turn conversation); ``conversation_pieces`` splits its rendering at each answer so
SFT can train every turn in one row.
"""

from __future__ import annotations

from typing import Any

IMAGE_MARKER = "<image>"


def to_messages(prompt: str | list[dict[str, Any]], n_images: int) -> list[dict[str, Any]]:
    """Normalise a record prompt to chat messages with exactly ``n_images`` image entries."""
    if isinstance(prompt, list):
        found = sum(
            1 for m in prompt for c in (m.get("content") if isinstance(m.get("content"), list) else [])
            if c.get("type") == "image"
        )
        if found != n_images:
            raise ValueError(f"prompt messages hold {found} image entries but the record has {n_images} images")
        return prompt
    pieces = prompt.split(IMAGE_MARKER)
    n_markers = len(pieces) - 1
    if n_markers not in (0, n_images):
        raise ValueError(f"prompt has {n_markers} {IMAGE_MARKER} markers but the record has {n_images} images")
    content: list[dict[str, Any]] = []
    if n_markers == 0:
        content += [{"type": "image"} for _ in range(n_images)]
        pieces = [prompt]
    for i, piece in enumerate(pieces):
        if i > 0:
            content.append({"type": "image"})
        if piece.strip():
            content.append({"type": "text", "text": piece.strip()})
    return [{"role": "user", "content": content}]


def render_prompt(processor: Any, prompt: str | list[dict[str, Any]], n_images: int) -> str:
    """Chat-formatted prompt text ending where the assistant's answer starts (generation prompt on)."""
    messages = to_messages(prompt, n_images)
    return processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def answer_ids(tokenizer: Any, answer: str) -> list[int]:
    """Token ids of an answer as the model must produce it after the prompt: text then EOS."""
    ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
    return list(ids) + [tokenizer.eos_token_id]


def _assistant_text(message: dict[str, Any]) -> str:
    """The answer text of an assistant message: its string content, or its text parts joined."""
    content = message["content"]
    return content if isinstance(content, str) else "".join(part["text"] for part in content)


def earlier_answers(prompt: str | list[dict[str, Any]]) -> list[str]:
    """The answers of the assistant messages inside a message prompt, in order ([] for a text prompt)."""
    if isinstance(prompt, str):
        return []
    return [_assistant_text(m) for m in prompt if m["role"] == "assistant"]


def conversation_pieces(processor: Any, prompt: str | list[dict[str, Any]], n_images: int) -> list[str]:
    """The chat-template text around each answer of a conversation: ``n`` pieces for ``n - 1`` earlier answers.

    The row the model trains on is ``p_1 a_1 p_2 a_2 ... p_n <chosen>``, each answer ``a_k`` as ``answer_ids``
    (text + EOS), which is what the model sees when it generates the conversation turn by turn. ``p_1`` is
    the template's rendering of the messages before the first answer with the generation prompt on;
    ``p_{k+1}`` is the text the template adds after the conversation closed at ``a_k`` up to the next
    generation prompt. Where the template renders a past answer as exactly its text + EOS (every family of
    ``mmalign.models.tiny``), what it writes after that EOS (e.g. a newline) opens ``p_{k+1}``, so the row is
    token for token the template's rendering of the whole conversation; where it renders past answers its own
    way (the lab model's template puts a space before them), the model's own answer stands in for that
    rendering. A text prompt gives one piece: ``render_prompt``.
    """
    messages = to_messages(prompt, n_images)
    ends = [i for i, m in enumerate(messages) if m["role"] == "assistant"] + [len(messages)]
    eos = processor.tokenizer.eos_token
    pieces, closed, carry = [], "", ""
    for turn, end in enumerate(ends, start=1):
        opened = processor.apply_chat_template(messages[:end], tokenize=False, add_generation_prompt=True)
        if not opened.startswith(closed):
            raise ValueError(f"the chat template renders the conversation before answer {turn} differently from "
                             f"the conversation closed at answer {turn - 1}, so its turns cannot share one row")
        pieces.append(carry + opened[len(closed):])
        if end < len(messages):
            answer = _assistant_text(messages[end]) + eos
            closed = processor.apply_chat_template(messages[:end + 1], tokenize=False, add_generation_prompt=False)
            rendered = closed[len(opened):] if closed.startswith(opened) else ""
            carry = rendered[len(answer):] if rendered.startswith(answer) else ""
    return pieces
