"""Prompt rendering shared by every stage: one record prompt -> the model's chat-formatted text.

A record's ``prompt`` is either plain text (``"<image>\\nWhat is shown?"``; each ``<image>`` marks where an
image goes, and images without a marker go first) or a list of chat messages in the Hugging Face format
(``{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "..."}]}``).
Rendering goes through the processor's own chat template, so the same record trains LLaVA, Qwen2-VL or
Idefics3 with each model's native format. Answers are tokenized apart from the prompt (see
``answer_ids``) so prompt/answer boundaries are exact for every tokenizer.
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
