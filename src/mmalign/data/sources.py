"""Adapters from published preference / SFT layouts to ``PreferenceRecord``s, one small function each.

Each converter takes one source row (a dict as read from the source's JSON / JSONL / Parquet file or a
``datasets`` row; images as paths, bytes, ``{"bytes", "path"}`` structs or decoded PIL images) and a row key
(``<input name>-<row number>``, for rows without an id), and returns the records it yields. Image paths stay
relative to the source's image folder, which becomes the data root. Field names follow the code that reads
each source (cited per function). A row missing a field raises ``FieldError``; ``mmalign.data.source_files``
streams files through the converters and names file, row and field in its errors.
"""

from __future__ import annotations

import io
import itertools
import json
import logging
from collections.abc import Callable
from typing import Any, NamedTuple

from PIL import Image

from mmalign.data.chat import IMAGE_MARKER
from mmalign.data.schema import FieldError, PreferenceRecord

logger = logging.getLogger(__name__)


def _get(row: dict, key: str, kind: type | tuple[type, ...], where: str | None = None) -> Any:
    """``row[key]`` of the given type, or FieldError naming the field."""
    name = where or key
    if key not in row:
        raise FieldError(name, "missing in the source row")
    value = row[key]
    if not isinstance(value, kind):
        raise FieldError(name, f"expected {kind}, got {type(value).__name__}")
    return value


def _image_ref(ref: Any, where: str) -> str | bytes:
    """A source image (path, bytes, ``{"bytes", "path"}`` struct, or a PIL image as ``datasets`` decodes one)
    -> record image reference; a PIL image is stored as lossless PNG bytes."""
    if isinstance(ref, Image.Image):
        buf = io.BytesIO()
        ref.save(buf, format="PNG")
        return buf.getvalue()
    if isinstance(ref, dict) and set(ref) <= {"bytes", "path"}:
        ref = ref.get("bytes") or ref.get("path")
    if not isinstance(ref, (str, bytes)) or not ref:
        raise FieldError(where, f"expected an image path, bytes or {{bytes, path}}, got {ref!r:.60}")
    return ref


def _row_id(row: dict, key: str, fallback: str) -> str:
    return str(row[key]) if key in row and row[key] is not None else fallback


def _content(text: str) -> list[dict[str, Any]]:
    """Text with ``<image>`` markers -> chat content parts, an image part where each marker was."""
    parts: list[dict[str, Any]] = []
    for i, piece in enumerate(text.split(IMAGE_MARKER)):
        if i > 0:
            parts.append({"type": "image"})
        if piece.strip():
            parts.append({"type": "text", "text": piece.strip()})
    return parts


def _llava_turns_to_prompt(turns: list[dict], n_images: int, where: str) -> str | list[dict]:
    """LLaVA ``[{from: human|gpt, value}]`` turns ending with a human turn -> a record prompt.

    One turn stays text (its ``<image>`` markers kept); several become chat messages, with the image
    parts put at the front of the first user message when the source text carries no marker.
    """
    roles = {"human": "user", "gpt": "assistant"}
    if not turns or not isinstance(turns[-1], dict) or turns[-1].get("from") != "human":
        raise FieldError(where, "an answer must follow a human turn")
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or turn.get("from") not in roles or not isinstance(turn.get("value"), str):
            raise FieldError(f"{where}[{i}]", f"expected {{from: human|gpt, value: str}}, got {turn!r:.80}")
    if len(turns) == 1:
        return turns[0]["value"]
    return _with_image_parts([{"role": roles[t["from"]], "content": _content(t["value"])} for t in turns], n_images)


def _with_image_parts(messages: list[dict], n_images: int) -> list[dict]:
    """Messages without any image part get ``n_images`` of them at the front of the first user message,
    as TRL's ``prepare_multimodal_messages`` places them (string content becomes one text part)."""
    parts = [m["content"] for m in messages if isinstance(m, dict) and isinstance(m.get("content"), list)]
    if n_images == 0 or any(isinstance(p, dict) and p.get("type") == "image" for c in parts for p in c):
        return messages
    out = [dict(m) for m in messages]
    for message in out:
        if message.get("role") == "user":
            content = message.get("content")
            content = [{"type": "text", "text": content}] if isinstance(content, str) else list(content or [])
            message["content"] = [{"type": "image"}] * n_images + content
            break
    return out


def _single_answer(turns: list, where: str) -> str:
    """The text of a one-turn LLaVA ``gpt`` answer list ``[{from: gpt, value}]`` / last turn of a pair."""
    last = turns[-1] if turns else None
    if not isinstance(last, dict) or last.get("from") != "gpt" or not isinstance(last.get("value"), str):
        raise FieldError(where, f"expected the last turn to be {{from: gpt, value: str}}, got {last!r:.80}")
    return last["value"]


def _message_text(message: Any, where: str) -> str:
    """Text of one TRL assistant message (``content`` as a string or a list of text parts)."""
    if not isinstance(message, dict) or message.get("role") != "assistant":
        raise FieldError(where, f"expected an assistant message, got {message!r:.80}")
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in content):
        return "".join(p["text"] for p in content)
    raise FieldError(f"{where}.content", f"expected text content, got {content!r:.80}")


def _clean_messages(messages: list) -> list[dict]:
    """Drop the None-valued keys Arrow adds to message parts (``{"type": "image", "text": None}``)."""
    return [
        m | {"content": [{k: v for k, v in p.items() if v is not None} for p in m["content"]]}
        if isinstance(m, dict) and isinstance(m.get("content"), list) else m
        for m in messages
    ]


def from_trl(row: dict, key: str) -> list[PreferenceRecord]:
    """TRL vision preference row: ``images`` (or ``image``), ``prompt``, ``chosen``, ``rejected``.

    Prompt as text or conversational messages; chosen/rejected as text or assistant messages. Without a
    ``prompt`` column the prompt is implicit: the messages chosen and rejected share before their last turn.
    Source: huggingface/trl ``trl/data_utils.py`` (``is_conversational``, ``extract_prompt``) and
    ``examples/datasets/rlaif-v.py`` (the ``to_conversational`` layout).
    """
    refs = row["images"] if "images" in row else [_get(row, "image", (str, bytes, dict))]
    if not isinstance(refs, list):
        raise FieldError("images", f"expected a list, got {type(refs).__name__}")
    images = [_image_ref(r, f"images[{i}]") for i, r in enumerate(refs)]
    chosen, rejected = _get(row, "chosen", (str, list)), _get(row, "rejected", (str, list))
    if "prompt" in row:
        prompt = _get(row, "prompt", (str, list))
    else:
        if not (isinstance(chosen, list) and isinstance(rejected, list) and len(chosen) > 1):
            raise FieldError("prompt", "missing, and chosen/rejected are not conversations to take it from")
        if chosen[:-1] != rejected[:-1]:
            raise FieldError("rejected", "implicit prompt: chosen and rejected differ before their last turn")
        prompt, chosen, rejected = chosen[:-1], chosen[-1:], rejected[-1:]
    if isinstance(prompt, list):
        prompt = _with_image_parts(_clean_messages(prompt), len(images))
    chosen_text = chosen if isinstance(chosen, str) else _message_text(chosen[-1] if chosen else None, "chosen")
    rejected_text = rejected if isinstance(rejected, str) else _message_text(
        rejected[-1] if rejected else None, "rejected")
    return [PreferenceRecord(_row_id(row, "id", f"trl-{key}"), images, prompt, chosen_text, [rejected_text],
                             "trl")]


def from_povid(row: dict, key: str) -> list[PreferenceRecord]:
    """POVID preference row: ``image``, ``conversations`` (human, gpt = chosen), ``rejected_conversations``.

    Source: YiyangZhou/POVID ``llava/train/train_dpo.py`` (``LazySupervisedDataset.__getitem__``).
    """
    images = [_image_ref(row["image"], "image")] if "image" in row else []
    turns = _get(row, "conversations", list)
    rejected_turns = _get(row, "rejected_conversations", list)
    if turns[:-1] != rejected_turns[:-1]:
        raise FieldError("rejected_conversations", "the question differs from the one in conversations")
    prompt = _llava_turns_to_prompt(turns[:-1], len(images), "conversations")
    return [PreferenceRecord(_row_id(row, "id", f"povid-{key}"), images, prompt,
                             _single_answer(turns, "conversations"),
                             [_single_answer(rejected_turns, "rejected_conversations")], "povid")]


def from_rlhf_v(row: dict, key: str) -> list[PreferenceRecord]:
    """RLHF-V row (``openbmb/RLHF-V-Dataset``): ``image``, ``text`` = JSON {question, chosen, rejected}.

    ``origin_dataset``, ``origin_split``, ``idx`` and ``image_path`` go to meta.
    Source: RLHF-V/RLAIF-V ``muffin/data/datasets.py`` (``RLHFVDataset.__getitem__``).
    """
    try:
        text = json.loads(_get(row, "text", str))
    except json.JSONDecodeError as err:
        raise FieldError("text", f"not valid JSON: {err}") from err
    for key in ("question", "chosen", "rejected"):
        _get(text, key, str, where=f"text.{key}")
    meta = {k: row[k] for k in ("origin_dataset", "origin_split", "idx", "image_path") if row.get(k) is not None}
    return [PreferenceRecord(_row_id(row, "idx", f"rlhf_v-{key}"), [_image_ref(row.get("image"), "image")],
                             text["question"], text["chosen"], [text["rejected"]], "rlhf_v", meta)]


def _completions(row: dict) -> list[dict]:
    """VLFeedback completions as a list of dicts (``datasets`` may hand them over as a dict of lists)."""
    comps = _get(row, "completions", (list, dict))
    if isinstance(comps, dict):
        comps = [dict(zip(comps, values)) for values in zip(*comps.values())]
    return comps


class _Rated(NamedTuple):
    index: int
    rating: float
    response: str
    model: str


def _mean_rating(annotations: Any, where: str) -> float | None:
    """Average of the per-aspect ``Rating``s; None when one is missing or not a number (the set has "N/A")."""
    if not isinstance(annotations, dict) or not annotations:
        raise FieldError(where, f"expected {{aspect: {{Rating, Rationale}}}}, got {annotations!r:.80}")
    ratings = []
    for aspect, annotation in annotations.items():
        rating = annotation.get("Rating") if isinstance(annotation, dict) else None
        if not isinstance(rating, (str, int, float)):
            return None
        try:
            ratings.append(float(rating))
        except ValueError:  # "N/A": the annotator gave no score, so the completion cannot be ranked
            return None
    return sum(ratings) / len(ratings)


def from_vlfeedback(row: dict, key: str) -> list[PreferenceRecord]:
    """VLFeedback row (``MMInstruction/VLFeedback``): ``id``, ``prompt``, ``completions`` (+ ``models``).

    The published ``vlfeedback_80k.jsonl`` has no image path: the image is ``merged_images/<id>.jpg`` inside
    ``merged_images.zip`` (as the set's old loading script built it), so the data root is the folder the zip
    was unpacked in. A row that carries ``img_path`` (older copies) uses it instead.

    Each completion has ``model``, ``response`` and per-aspect ``annotations`` {aspect: {Rating,
    Rationale}}. Every pair of completions with different mean ratings becomes one record (the higher one
    chosen), with the mean-rating difference as ``meta.reward_margins`` (one margin for its one rejected answer, the
    field MM-DPO reads); unrated completions and pairs with
    identical text are left out. Source: TideDra/VL-RLHF ``src/vlrlhf/utils/data.py``
    (``make_vlfeedback_paired_dataset``).
    """
    rid = _row_id(row, "id", f"vlfeedback-{key}")
    prompt = _get(row, "prompt", str)
    if "img_path" in row:
        image = _image_ref(row["img_path"], "img_path")
    else:
        image = f"merged_images/{_get(row, 'id', (str, int))}.jpg"
    rated = []
    for i, comp in enumerate(_completions(row)):
        response = _get(comp, "response", str, where=f"completions[{i}].response")
        rating = _mean_rating(comp.get("annotations"), f"completions[{i}].annotations")
        if rating is None:
            logger.debug("vlfeedback %s: completion %d has a rating that is not a number; left out", rid, i)
        else:
            rated.append(_Rated(i, rating, response, str(comp.get("model", ""))))
    records = []
    for a, b in itertools.combinations(rated, 2):
        if a.rating == b.rating or a.response.strip() == b.response.strip():
            continue
        chosen, rejected = (a, b) if a.rating > b.rating else (b, a)
        meta = {"reward_margins": [chosen.rating - rejected.rating], "chosen_rating": chosen.rating,
                "rejected_rating": rejected.rating, "chosen_model": chosen.model, "rejected_model": rejected.model}
        records.append(PreferenceRecord(f"{rid}-{chosen.index}-{rejected.index}", [image], prompt, chosen.response,
                                        [rejected.response], "vlfeedback", meta))
    return records


def from_llava_rlhf(row: dict, key: str) -> list[PreferenceRecord]:
    """LLaVA-RLHF human preference row: ``image``, ``conversations``, ``output_1``, ``output_2``, ``preference``.

    ``conversations`` ends with a ``gpt`` turn whose text is replaced by each output; earlier turns are the
    prompt. ``preference`` (1 or 2) names the chosen output. Source: llava-rlhf/LLaVA-RLHF
    ``RLHF/data_utils/data_utils_rm.py`` (``preprocess_for_reward_modeling``).
    """
    images = [_image_ref(row["image"], "image")] if "image" in row else []
    turns = _get(row, "conversations", list)
    _single_answer(turns, "conversations")
    outputs = [_get(_get(row, key, dict), "value", str, where=f"{key}.value") for key in ("output_1", "output_2")]
    preference = _get(row, "preference", int)
    if preference not in (1, 2):
        raise FieldError("preference", f"expected 1 or 2, got {preference!r}")
    prompt = _llava_turns_to_prompt(turns[:-1], len(images), "conversations")
    chosen, rejected = outputs[preference - 1], outputs[2 - preference]
    return [PreferenceRecord(_row_id(row, "id", f"llava_rlhf-{key}"), images, prompt, chosen, [rejected],
                             "llava_rlhf")]


def from_llava_sft(row: dict, key: str) -> list[PreferenceRecord]:
    """LLaVA-Instruct style SFT row (``id``, ``image``, ``conversations``) -> one record per ``gpt`` turn.

    chosen = that turn's reference answer, rejected = []; the turns before it are the prompt (chat messages
    when there are several). ``image`` may be one path or a list. Record ids are ``<id>-<k>`` for the k-th
    answer. Source: haotian-liu/LLaVA ``llava/train/train.py`` (``LazySupervisedDataset``).
    """
    rid = _row_id(row, "id", f"llava_sft-{key}")
    raw_images = row.get("image", [])
    raw_images = raw_images if isinstance(raw_images, list) else [raw_images]
    images = [_image_ref(r, "image") for r in raw_images]
    turns = _get(row, "conversations", list)
    records = []
    for end, turn in enumerate(turns):
        if isinstance(turn, dict) and turn.get("from") == "gpt":
            prompt = _llava_turns_to_prompt(turns[:end], len(images), "conversations")
            answer = _single_answer(turns[: end + 1], f"conversations[{end}]")
            records.append(PreferenceRecord(f"{rid}-{len(records)}", images, prompt, answer, [], "llava_sft"))
    return records


def from_rlaif_v(row: dict, key: str) -> list[PreferenceRecord]:
    """RLAIF-V row (``openbmb/RLAIF-V-Dataset`` Parquet shards): flat ``image`` (``{bytes, path}``), ``question``,
    ``chosen``, ``rejected`` strings; ``idx`` is the id; ``ds_name``, ``origin_dataset``, ``origin_split`` (a JSON
    string: generating / labelling models, question type) and ``image_path`` go to meta as they are.
    Source: RLHF-V/RLAIF-V ``muffin/data/datasets.py`` (the flat-column branch of the preference dataset).
    """
    meta = {k: row[k] for k in ("ds_name", "origin_dataset", "origin_split", "image_path") if row.get(k) is not None}
    return [PreferenceRecord(_row_id(row, "idx", f"rlaif_v-{key}"), [_image_ref(row.get("image"), "image")],
                             _get(row, "question", str), _get(row, "chosen", str), [_get(row, "rejected", str)],
                             "rlaif_v", meta)]


_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                   "system": "system"}


def _marked_messages(messages: list[dict], n_images: int) -> str | list[dict]:
    """Messages with string content and ``<image>`` markers -> a record prompt: the text itself for one user
    turn (markers kept), else messages whose markers became image parts."""
    if len(messages) == 1 and messages[0]["role"] == "user":
        return messages[0]["content"]
    return _with_image_parts([{"role": m["role"], "content": _content(m["content"])} for m in messages], n_images)


def _sharegpt_turns(turns: list, where: str) -> list[dict]:
    """``[{from, value}]`` (LLaMA-Factory's default sharegpt tags; ``user``/``assistant`` also accepted) ->
    ``[{role, content}]``."""
    out = []
    for i, turn in enumerate(turns):
        if not (isinstance(turn, dict) and turn.get("from") in _SHAREGPT_ROLES and isinstance(turn.get("value"), str)):
            raise FieldError(f"{where}[{i}]", f"expected {{from: human|gpt|system, value: str}}, got {turn!r:.80}")
        out.append({"role": _SHAREGPT_ROLES[turn["from"]], "content": turn["value"]})
    return out


def from_llamafactory(row: dict, key: str) -> list[PreferenceRecord]:
    """LLaMA-Factory sharegpt ranking row: ``conversations`` ending with a human turn, ``chosen`` and ``rejected``
    (``{from: gpt, value}``), ``images`` (paths, ``<image>`` markers in the text), optional ``system``.

    Source: hiyouga/LLaMA-Factory ``data/README.md`` (sharegpt preference format) and
    ``src/llamafactory/data/converter.py`` (``SharegptDatasetConverter``).
    """
    images = [_image_ref(r, f"images[{i}]") for i, r in enumerate(row.get("images") or [])]
    messages = _sharegpt_turns(_get(row, "conversations", list), "conversations")
    if isinstance(row.get("system"), str) and row["system"].strip():
        messages = [{"role": "system", "content": row["system"]}, *messages]
    if not messages or messages[-1]["role"] != "user":
        raise FieldError("conversations", "an answer must follow a human turn")
    answers = [_sharegpt_turns([_get(row, k, dict)], k)[0] for k in ("chosen", "rejected")]
    if any(a["role"] != "assistant" for a in answers):
        raise FieldError("chosen", "chosen and rejected must be {from: gpt, value} turns")
    return [PreferenceRecord(_row_id(row, "id", f"llamafactory-{key}"), images, _marked_messages(messages, len(images)),
                             answers[0]["content"], [answers[1]["content"]], "llamafactory")]


def from_swift(row: dict, key: str) -> list[PreferenceRecord]:
    """ms-swift DPO row: ``messages`` (OpenAI-style, string content with ``<image>`` markers) ending with the
    chosen assistant turn, ``rejected_response`` (string), ``images`` (paths or ``{bytes, path}``).

    Source: modelscope/ms-swift docs "Custom Dataset" (RLHF / DPO format) and ``swift/llm/dataset/preprocessor``.
    """
    images = [_image_ref(r, f"images[{i}]") for i, r in enumerate(row.get("images") or [])]
    messages = _get(row, "messages", list)
    for i, m in enumerate(messages):
        if not (isinstance(m, dict) and m.get("role") in ("system", "user", "assistant")
                and isinstance(m.get("content"), str)):
            raise FieldError(f"messages[{i}]", f"expected {{role, content: str}}, got {m!r:.80}")
    if len(messages) < 2 or messages[-1]["role"] != "assistant" or messages[-2]["role"] != "user":
        raise FieldError("messages", "expected a user turn followed by the chosen assistant answer at the end")
    prompt = [{"role": m["role"], "content": m["content"]} for m in messages[:-1]]
    return [PreferenceRecord(_row_id(row, "id", f"swift-{key}"), images, _marked_messages(prompt, len(images)),
                             messages[-1]["content"], [_get(row, "rejected_response", str)], "swift")]


CONVERTERS: dict[str, Callable[[dict, str], list[PreferenceRecord]]] = {
    "trl": from_trl, "povid": from_povid, "rlhf_v": from_rlhf_v, "rlaif_v": from_rlaif_v,
    "vlfeedback": from_vlfeedback, "llava_rlhf": from_llava_rlhf, "llava_sft": from_llava_sft,
    "llamafactory": from_llamafactory, "swift": from_swift,
}
