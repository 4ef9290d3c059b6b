"""Adapters from published preference / SFT layouts to ``PreferenceRecord``s, one small function each.

Each converter takes one source row (a dict as read from the source's JSON / JSONL / Parquet file, images
as paths, bytes or ``{"bytes", "path"}`` structs) and returns the records it yields. Image paths stay
relative to the source's image folder, which becomes the data root. Field names follow the code that
reads each source (cited per function). A row missing a field raises ``RecordError`` naming file, row and
field via ``convert_file``; records are validated again when written or read.
"""

from __future__ import annotations

import itertools
import json
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

from mmalign.data import io
from mmalign.data.chat import IMAGE_MARKER
from mmalign.data.schema import FieldError, PreferenceRecord, RecordError

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
    """A source image (path, bytes, or ``{"bytes", "path"}`` struct) -> record image reference."""
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


def from_trl(row: dict, index: int) -> list[PreferenceRecord]:
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
    return [PreferenceRecord(_row_id(row, "id", f"trl-{index}"), images, prompt, chosen_text, [rejected_text],
                             "trl")]


def from_povid(row: dict, index: int) -> list[PreferenceRecord]:
    """POVID preference row: ``image``, ``conversations`` (human, gpt = chosen), ``rejected_conversations``.

    Source: YiyangZhou/POVID ``llava/train/train_dpo.py`` (``LazySupervisedDataset.__getitem__``).
    """
    images = [_image_ref(row["image"], "image")] if "image" in row else []
    turns = _get(row, "conversations", list)
    rejected_turns = _get(row, "rejected_conversations", list)
    if turns[:-1] != rejected_turns[:-1]:
        raise FieldError("rejected_conversations", "the question differs from the one in conversations")
    prompt = _llava_turns_to_prompt(turns[:-1], len(images), "conversations")
    return [PreferenceRecord(_row_id(row, "id", f"povid-{index}"), images, prompt,
                             _single_answer(turns, "conversations"),
                             [_single_answer(rejected_turns, "rejected_conversations")], "povid")]


def from_rlhf_v(row: dict, index: int) -> list[PreferenceRecord]:
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
    return [PreferenceRecord(_row_id(row, "idx", f"rlhf_v-{index}"), [_image_ref(row.get("image"), "image")],
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


def from_vlfeedback(row: dict, index: int) -> list[PreferenceRecord]:
    """VLFeedback row (``MMInstruction/VLFeedback``): ``id``, ``prompt``, ``img_path``, ``completions``.

    Each completion has ``model``, ``response`` and per-aspect ``annotations`` {aspect: {Rating,
    Rationale}}. Every pair of completions with different mean ratings becomes one record (the higher one
    chosen), with the mean-rating difference as ``meta.reward_margin``; unrated completions and pairs with
    identical text are left out. Source: TideDra/VL-RLHF ``src/vlrlhf/utils/data.py``
    (``make_vlfeedback_paired_dataset``).
    """
    rid = _row_id(row, "id", f"vlfeedback-{index}")
    prompt, image = _get(row, "prompt", str), _image_ref(row.get("img_path"), "img_path")
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
        meta = {"reward_margin": chosen.rating - rejected.rating, "chosen_rating": chosen.rating,
                "rejected_rating": rejected.rating, "chosen_model": chosen.model, "rejected_model": rejected.model}
        records.append(PreferenceRecord(f"{rid}-{chosen.index}-{rejected.index}", [image], prompt, chosen.response,
                                        [rejected.response], "vlfeedback", meta))
    return records


def from_llava_rlhf(row: dict, index: int) -> list[PreferenceRecord]:
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
    return [PreferenceRecord(_row_id(row, "id", f"llava_rlhf-{index}"), images, prompt, chosen, [rejected],
                             "llava_rlhf")]


def from_llava_sft(row: dict, index: int) -> list[PreferenceRecord]:
    """LLaVA-Instruct style SFT row (``id``, ``image``, ``conversations``) -> one record per ``gpt`` turn.

    chosen = that turn's reference answer, rejected = []; the turns before it are the prompt (chat messages
    when there are several). ``image`` may be one path or a list. Record ids are ``<id>-<k>`` for the k-th
    answer. Source: haotian-liu/LLaVA ``llava/train/train.py`` (``LazySupervisedDataset``).
    """
    rid = _row_id(row, "id", f"llava_sft-{index}")
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


CONVERTERS: dict[str, Callable[[dict, int], list[PreferenceRecord]]] = {
    "trl": from_trl, "povid": from_povid, "rlhf_v": from_rlhf_v, "vlfeedback": from_vlfeedback,
    "llava_rlhf": from_llava_rlhf, "llava_sft": from_llava_sft,
}


def load_rows(path: str | Path) -> Iterator[tuple[int, Any]]:
    """``(row number, row)`` of a ``.json`` (array), ``.jsonl`` or ``.parquet`` source file (1-based)."""
    path = io.local_path(path, "source file")
    if path.suffix == ".parquet":
        yield from io.read_parquet_rows(path)
    elif path.suffix == ".jsonl":
        for line, text in io.read_jsonl_lines(path):
            try:
                yield line, json.loads(text)
            except json.JSONDecodeError as err:
                raise RecordError(f"not valid JSON: {err}", file=str(path), line=line) from err
    elif path.suffix == ".json":
        rows = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(rows, list):
            raise RecordError(f"expected a JSON array of rows, got {type(rows).__name__}", file=str(path))
        yield from enumerate(rows, start=1)
    else:
        raise ValueError(f"{path}: unknown source file type {path.suffix!r}; expected .json, .jsonl or .parquet")


def convert_file(path: str | Path, fmt: str) -> list[PreferenceRecord]:
    """All records of a source file in layout ``fmt`` (a key of ``CONVERTERS``); "line" = row number."""
    if fmt not in CONVERTERS:
        raise ValueError(f"unknown source format {fmt!r}; known: {sorted(CONVERTERS)}")
    records: list[PreferenceRecord] = []
    n_rows = 0
    for number, row in load_rows(path):
        n_rows += 1
        try:
            if not isinstance(row, dict):
                raise FieldError(None, f"expected an object, got {type(row).__name__}")
            records.extend(CONVERTERS[fmt](row, number))
        except FieldError as err:
            rid = str(row.get("id")) if isinstance(row, dict) and row.get("id") is not None else None
            raise RecordError(err.reason, file=str(path), line=number, record_id=rid, field=err.field) from err
    logger.info("%s: %d %s row(s) -> %d record(s)", path, n_rows, fmt, len(records))
    return records
