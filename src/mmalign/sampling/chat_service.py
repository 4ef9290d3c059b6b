"""OpenAI chat-completion semantics over one local model, apart from HTTP (``mmalign.sampling.server``).

Requests follow the OpenAI chat format: ``content`` is a string or a list of ``text`` and ``image_url`` parts,
images given inline as ``data:image/...;base64,...`` URLs (the service never fetches a URL). Decoding goes
through ``mmalign.sampling.generate.generate``: ``temperature`` 0 is greedy, otherwise sampling with
``top_p``. Choice ``i`` of ``n`` is generated with seed ``seed + i`` (``seed`` defaults to 0), so every reply is
reproducible and a choice's text does not depend on ``n`` or on streaming. Implemented besides: ``stop`` (up to
4 strings, cut before the first), ``stream`` (with ``stream_options.include_usage``), ``logprobs`` /
``top_logprobs`` (not with ``stream``), ``response_format`` ``text`` and ``json_object``. ``json_object`` is
*checked, not constrained*: an answer that does not parse as a JSON object is refused with HTTP 422 (code
``invalid_json_output``) instead of being returned; it cannot be streamed. Other fields (``tools``, ...) are
refused with HTTP 400 rather than ignored.
"""

from __future__ import annotations

import base64
import binascii
import json
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from mmalign.data.collate import encode_prompts
from mmalign.data.images import ImageError, decode_image
from mmalign.sampling.generate import GenerationParams, cut_at_stop, generate

_ACCEPTED = {"model", "messages", "temperature", "top_p", "max_tokens", "max_completion_tokens", "seed", "n",
             "stream", "stream_options", "stop", "response_format", "logprobs", "top_logprobs", "user"}
_ROLES = ("system", "user", "assistant")


class RequestError(ValueError):
    """A request the service refuses; becomes an OpenAI-style error body with HTTP ``status``."""

    def __init__(self, message: str, *, status: int = 400, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.param, self.code = status, param, code

    def body(self) -> dict[str, Any]:
        kind = {401: "authentication_error", 404: "not_found_error", 429: "rate_limit_error"}.get(
            self.status, "invalid_request_error")
        return {"error": {"message": str(self), "type": kind, "param": self.param, "code": self.code}}


def _image_from_data_url(url: Any, where: str) -> Image.Image:
    if not isinstance(url, str) or not url.startswith("data:image/") or ";base64," not in url:
        raise RequestError(f"{where}: only inline images (data:image/...;base64,...) are accepted", param=where)
    try:
        data = base64.b64decode(url.split(";base64,", 1)[1], validate=True)
        return decode_image(data, where)
    except (binascii.Error, ImageError) as err:
        raise RequestError(f"{where}: {err}", param=where) from err


def _convert_content(content: Any, where: str, images: list[Image.Image]) -> list[dict[str, str]]:
    """OpenAI content -> HF content parts (``{"type": "text"|"image"}``); decoded images appended in order."""
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if not isinstance(content, list) or not content:
        raise RequestError(f"{where}: content must be a string or a non-empty list of parts", param=where)
    parts = []
    for i, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            parts.append({"type": "text", "text": part["text"]})
        elif kind == "image_url" and isinstance(part.get("image_url"), dict):
            images.append(_image_from_data_url(part["image_url"].get("url"), f"{where}[{i}].image_url.url"))
            parts.append({"type": "image"})
        else:
            raise RequestError(f"{where}[{i}]: expected a text or image_url part, got {str(part)[:80]}",
                               param=f"{where}[{i}]")
    return parts


def parse_messages(messages: Any) -> tuple[list[dict[str, Any]], list[Image.Image]]:
    """OpenAI ``messages`` -> (record-style chat messages with image slots, the images in order)."""
    if not isinstance(messages, list) or not messages:
        raise RequestError("messages must be a non-empty list", param="messages")
    images: list[Image.Image] = []
    out = []
    for i, message in enumerate(messages):
        role = message.get("role") if isinstance(message, dict) else None
        if role not in _ROLES:
            raise RequestError(f"messages[{i}].role must be one of {list(_ROLES)}, got {role!r}",
                               param=f"messages[{i}].role")
        out.append({"role": role, "content": _convert_content(message.get("content"), f"messages[{i}].content",
                                                               images)})
    if out[-1]["role"] != "user":
        raise RequestError("the last message must be the user's turn", param="messages")
    return out, images


@dataclass(frozen=True)
class Limits:
    """What one request may ask for: ``max_tokens`` per choice, ``max_n`` choices."""

    max_tokens: int = 4096
    max_n: int = 8


@dataclass(frozen=True)
class ChatRequest:
    """A validated request: decoding ``params``, ``seed`` of choice 0, and the reply's shape."""

    params: GenerationParams
    seed: int
    n: int
    stream: bool
    include_usage: bool
    top_logprobs: int | None  # None: no logprobs
    json_object: bool


def _integer(request: dict[str, Any], key: str, default: int) -> int:
    value = request.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool):
        raise RequestError(f"{key} must be an integer, got {value!r}", param=key)
    return value


def _stop(value: Any) -> tuple[str, ...]:
    stops = [value] if isinstance(value, str) else value if value is not None else []
    if not isinstance(stops, list) or len(stops) > 4 or not all(isinstance(s, str) and s for s in stops):
        raise RequestError("stop must be a non-empty string or a list of up to 4 of them", param="stop")
    return tuple(stops)


def _response_format(value: Any) -> bool:
    kind = value.get("type") if isinstance(value, dict) else None
    if value is not None and kind not in ("text", "json_object"):
        raise RequestError(f"response_format type {kind!r} is not supported (text, json_object)",
                           param="response_format")
    return kind == "json_object"


def _logprobs(request: dict[str, Any]) -> int | None:
    if request.get("logprobs", False) is not True:
        if "top_logprobs" in request:
            raise RequestError("top_logprobs needs logprobs: true", param="top_logprobs")
        return None
    top = _integer(request, "top_logprobs", 0)
    if not 0 <= top <= 20:
        raise RequestError(f"top_logprobs must be in [0, 20], got {top}", param="top_logprobs")
    return top


def parse_request(request: dict[str, Any], default_max_tokens: int, limits: Limits) -> ChatRequest:
    """Decoding settings and reply shape of a request body; RequestError names the offending field."""
    unknown = sorted(set(request) - _ACCEPTED)
    if unknown:
        raise RequestError(f"unsupported field(s) {unknown}; this server accepts {sorted(_ACCEPTED)}",
                           param=unknown[0])
    max_tokens = _integer(request, "max_completion_tokens", _integer(request, "max_tokens", default_max_tokens))
    n, seed = _integer(request, "n", 1), _integer(request, "seed", 0)
    if not 1 <= max_tokens <= limits.max_tokens or not 1 <= n <= limits.max_n:
        raise RequestError(f"need 1 <= max_tokens <= {limits.max_tokens} and 1 <= n <= {limits.max_n}, got "
                           f"{max_tokens}, {n}", param="max_tokens" if n <= limits.max_n else "n")
    values = {"temperature": request.get("temperature", 1.0), "top_p": request.get("top_p", 1.0)}
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values.values()):
        raise RequestError("temperature and top_p must be numbers", param="temperature")
    stream, options = request.get("stream", False), request.get("stream_options") or {}
    if not isinstance(stream, bool) or not isinstance(options, dict):
        raise RequestError("stream must be a boolean and stream_options an object", param="stream")
    top_logprobs, json_object = _logprobs(request), _response_format(request.get("response_format"))
    if stream and (top_logprobs is not None or json_object):
        raise RequestError("stream cannot be combined with logprobs or a json_object response_format",
                           param="stream")
    try:
        params = GenerationParams(max_new_tokens=max_tokens, temperature=float(values["temperature"]),
                                  top_p=float(values["top_p"]), stop=_stop(request.get("stop")))
    except ValueError as err:
        raise RequestError(str(err)) from err
    return ChatRequest(params, seed, n, stream, bool(options.get("include_usage")), top_logprobs, json_object)


class _TokenCollector:
    """A transformers streamer: keeps the generated token ids and, with ``on_text``, hands on each piece of
    the answer as soon as it is certain to be part of the final text (held back: trailing whitespace, an
    unfinished character, anything that may begin a stop string)."""

    def __init__(self, tokenizer: Any, stop: tuple[str, ...], on_text: Callable[[str], None] | None):
        self.tokenizer, self.stop, self.on_text = tokenizer, stop, on_text
        self.ids: list[int] = []
        self.sent = ""
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:  # the first call carries the prompt
            self._prompt_seen = True
            return
        self.ids += value.reshape(-1).tolist()
        if self.on_text is not None:
            self.send(self._settled())

    def end(self) -> None:
        """Called by ``generate`` when decoding stops; the final text is sent by ``send`` from the answer."""

    def _settled(self) -> str:
        text, stopped = cut_at_stop(self.tokenizer.decode(self.ids, skip_special_tokens=True).lstrip(), self.stop)
        if not stopped:
            for stop in self.stop:  # a tail that could grow into a stop string waits
                for k in range(len(stop) - 1, 0, -1):
                    if text.endswith(stop[:k]):
                        text = text[:-k]
                        break
        return text.rstrip().rstrip("\ufffd").rstrip()

    def send(self, text: str) -> None:
        """Hand on what ``text`` adds to what was sent (a text that does not extend it waits for the end)."""
        if text.startswith(self.sent) and len(text) > len(self.sent):
            self.on_text(text[len(self.sent):])
            self.sent = text


@torch.no_grad()
def token_logprobs(model: Any, processor: Any, messages: list[dict[str, Any]], images: list[Image.Image],
                   ids: list[int], top: int) -> list[dict[str, Any]]:
    """OpenAI ``logprobs.content`` of generated ``ids`` [T]: one teacher-forced pass over prompt + answer, each
    token's log-prob under the model (temperature 1) and the ``top`` likeliest alternatives."""
    inputs = encode_prompts(processor, [messages], [images]).to(model.device)
    prompt_len = inputs["input_ids"].shape[1]
    answer = torch.tensor([ids], dtype=inputs["input_ids"].dtype, device=model.device)
    inputs["input_ids"] = torch.cat([inputs["input_ids"], answer], dim=1)
    inputs["attention_mask"] = torch.cat([inputs["attention_mask"], torch.ones_like(answer)], dim=1)
    if "token_type_ids" in inputs:
        inputs["token_type_ids"] = torch.cat([inputs["token_type_ids"], torch.zeros_like(answer)], dim=1)
    floats = {k: v.to(model.dtype) for k, v in inputs.items() if v.is_floating_point()}
    logits = model(**(dict(inputs) | floats)).logits[0, prompt_len - 1:-1].float()  # [T, V]
    logps = torch.log_softmax(logits, dim=-1)
    tokenizer = processor.tokenizer

    def entry(token_id: int, logp: float) -> dict[str, Any]:
        text = tokenizer.decode([token_id])
        return {"token": text, "logprob": logp, "bytes": list(text.encode("utf-8"))}

    out = []
    for t, token_id in enumerate(ids):
        alternatives = torch.topk(logps[t], top) if top else None
        out.append(entry(token_id, float(logps[t, token_id])) | {"top_logprobs": [] if alternatives is None else [
            entry(int(i), float(v)) for v, i in zip(alternatives.values, alternatives.indices)]})
    return out


class ChatService:
    """Answers chat-completion requests with one loaded model, one generation at a time."""

    def __init__(self, model: Any, processor: Any, name: str, default_max_tokens: int = 256,
                 limits: Limits = Limits()):
        self.model, self.processor, self.name = model, processor, name
        self.default_max_tokens, self.limits = default_max_tokens, limits
        self._lock = threading.Lock()
        self.created = int(time.time())

    def models(self) -> dict[str, Any]:
        return {"object": "list", "data": [{"id": self.name, "object": "model", "created": self.created,
                                            "owned_by": "mmalign"}]}

    def prepare(self, body: Any) -> tuple[ChatRequest, list[dict[str, Any]], list[Image.Image]]:
        """Validate a request body: (settings, chat messages, images); raises RequestError."""
        if not isinstance(body, dict):
            raise RequestError("the request body must be a JSON object")
        if body.get("model") != self.name:
            raise RequestError(f"model {body.get('model')!r} is not served here; this server has {self.name!r}",
                               status=404, param="model", code="model_not_found")
        messages, images = parse_messages(body.get("messages"))
        return parse_request(body, self.default_max_tokens, self.limits), messages, images

    def _choice(self, request: ChatRequest, messages: list, images: list, index: int,
                on_text: Callable[[str], None] | None = None) -> tuple[str, list[int], str]:
        """(answer, generated token ids, finish_reason) of choice ``index``."""
        collector = _TokenCollector(self.processor.tokenizer, request.params.stop, on_text)
        (answer,) = generate(self.model, self.processor, [messages], [images], request.params,
                             seed=request.seed + index, batch_size=1, streamer=collector)
        if on_text is not None:
            collector.send(answer)
        raw = self.processor.tokenizer.decode(collector.ids, skip_special_tokens=True)
        eos = self.model.generation_config.eos_token_id
        ended = bool(collector.ids) and collector.ids[-1] in (eos if isinstance(eos, list) else [eos])
        stopped = cut_at_stop(raw, request.params.stop)[1]
        full = len(collector.ids) >= request.params.max_new_tokens and not ended and not stopped
        return answer, collector.ids, "length" if full else "stop"

    def _prompt_tokens(self, messages: list, images: list) -> int:
        return int(encode_prompts(self.processor, [messages], [images])["input_ids"].shape[1])

    def complete(self, body: Any) -> dict[str, Any]:
        """One OpenAI ``chat.completion`` object for a request body; raises RequestError on bad input.

        ``usage.completion_tokens`` counts the tokens generated for all choices (EOS included), exactly.
        """
        request, messages, images = self.prepare(body)
        choices, generated = [], 0
        with self._lock:
            prompt_tokens = self._prompt_tokens(messages, images)
            for i in range(request.n):
                answer, ids, finish = self._choice(request, messages, images, i)
                if request.json_object:
                    _check_json_object(answer, i)
                choice = {"index": i, "message": {"role": "assistant", "content": answer}, "finish_reason": finish,
                          "logprobs": None}
                if request.top_logprobs is not None:
                    kept = _answer_ids(self.processor.tokenizer, ids, answer)
                    choice["logprobs"] = {"content": token_logprobs(self.model, self.processor, messages, images,
                                                                    kept, request.top_logprobs), "refusal": None}
                choices.append(choice)
                generated += len(ids)
        return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
                "model": self.name, "choices": choices,
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": generated,
                          "total_tokens": prompt_tokens + generated}}

    def stream(self, request: ChatRequest, messages: list, images: list,
               emit: Callable[[dict[str, Any]], None]) -> None:
        """Generate a prepared request, calling ``emit`` with each ``chat.completion.chunk`` as text is
        settled: per choice a role chunk, content chunks, a chunk with its finish_reason; then, with
        ``include_usage``, a chunk with empty choices and the usage."""
        base = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion.chunk", "created": int(time.time()),
                "model": self.name}

        def chunk(index: int, delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
            return base | {"choices": [{"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}]}

        generated = 0
        with self._lock:
            prompt_tokens = self._prompt_tokens(messages, images)
            for i in range(request.n):
                emit(chunk(i, {"role": "assistant", "content": ""}))
                _, ids, finish = self._choice(request, messages, images, i,
                                              on_text=lambda text, i=i: emit(chunk(i, {"content": text})))
                emit(chunk(i, {}, finish))
                generated += len(ids)
        if request.include_usage:
            emit(base | {"choices": [], "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": generated,
                                                  "total_tokens": prompt_tokens + generated}})


def _answer_ids(tokenizer: Any, ids: list[int], answer: str) -> list[int]:
    """The generated tokens that make up ``answer`` (special tokens and those past a stop string dropped)."""
    special = set(tokenizer.all_special_ids)
    kept: list[int] = []
    for token_id in ids:
        if len(tokenizer.decode(kept, skip_special_tokens=True).strip()) >= len(answer):
            break
        if token_id not in special:
            kept.append(token_id)
    return kept


def _check_json_object(answer: str, index: int) -> None:
    try:
        ok = isinstance(json.loads(answer), dict)
    except json.JSONDecodeError:
        ok = False
    if not ok:
        raise RequestError(f"response_format json_object: the model's answer (choice {index}) is not a JSON object: "
                           f"{answer[:200]!r}", status=422, param="response_format", code="invalid_json_output")
