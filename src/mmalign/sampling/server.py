"""An OpenAI-compatible chat server over one local model: ``POST /v1/chat/completions``, ``GET /v1/models``.

So users can run their own corrupter or judge on a local checkpoint, and so the API client is tested against
a real server. Requests follow the OpenAI chat format: ``content`` is a string or a list of ``text`` and
``image_url`` parts, images given inline as ``data:image/...;base64,...`` URLs (the server never fetches a
URL). Decoding goes through ``mmalign.sampling.generate.generate``: ``temperature`` 0 is greedy, otherwise
sampling with ``top_p``; ``seed`` (default 0) makes every reply reproducible. Requests are served by threads
but the model runs one request at a time. Fields the server does not implement (``stop``, ``tools``,
``stream: true``, ``n > 1``, ...) are refused with HTTP 400 rather than ignored.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import threading
import time
import uuid
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from PIL import Image

from mmalign.data.images import ImageError, decode_image
from mmalign.models.loading import load_vlm
from mmalign.data.collate import encode_prompts
from mmalign.sampling.generate import GenerationParams, generate

logger = logging.getLogger(__name__)

_ACCEPTED = {"model", "messages", "temperature", "top_p", "max_tokens", "max_completion_tokens", "seed", "n",
             "stream", "user"}
_ROLES = ("system", "user", "assistant")


class RequestError(ValueError):
    """A request the server refuses; becomes an OpenAI-style error body with ``status``."""

    def __init__(self, message: str, *, status: int = 400, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.param, self.code = status, param, code

    def body(self) -> dict[str, Any]:
        kind = "not_found_error" if self.status == 404 else "invalid_request_error"
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


def parse_params(request: dict[str, Any], default_max_tokens: int) -> tuple[GenerationParams, int]:
    """Decoding settings and seed of a request (OpenAI defaults: temperature 1, top_p 1)."""
    unknown = sorted(set(request) - _ACCEPTED)
    if unknown:
        raise RequestError(f"unsupported field(s) {unknown}; this server accepts {sorted(_ACCEPTED)}",
                           param=unknown[0])
    if request.get("stream", False) is not False or request.get("n", 1) != 1:
        raise RequestError("only non-streamed requests with n = 1 are supported", param="stream")
    max_tokens = request.get("max_completion_tokens", request.get("max_tokens", default_max_tokens))
    seed = request.get("seed", 0)
    values = {"temperature": request.get("temperature", 1.0), "top_p": request.get("top_p", 1.0)}
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or not isinstance(seed, int):
        raise RequestError("max_tokens and seed must be integers", param="max_tokens")
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values.values()):
        raise RequestError("temperature and top_p must be numbers", param="temperature")
    try:
        params = GenerationParams(max_new_tokens=max_tokens, temperature=float(values["temperature"]),
                                  top_p=float(values["top_p"]))
    except ValueError as err:
        raise RequestError(str(err)) from err
    return params, seed


class ChatService:
    """Answers chat-completion requests with one loaded model, one generation at a time."""

    def __init__(self, model: Any, processor: Any, name: str, default_max_tokens: int = 256):
        self.model, self.processor, self.name = model, processor, name
        self.default_max_tokens = default_max_tokens
        self._lock = threading.Lock()
        self.created = int(time.time())

    def models(self) -> dict[str, Any]:
        return {"object": "list", "data": [{"id": self.name, "object": "model", "created": self.created,
                                            "owned_by": "mmalign"}]}

    def complete(self, request: Any) -> dict[str, Any]:
        """One OpenAI ``chat.completion`` object for a request body; raises RequestError on bad input.

        ``usage`` counts the rendered prompt (image tokens included) and the answer *re-tokenized* (``generate``
        returns text), and ``finish_reason`` is "length" when that count reaches ``max_tokens``: exact when the
        model emits canonical tokenizations (trained models, as a rule), approximate otherwise.
        """
        if not isinstance(request, dict):
            raise RequestError("the request body must be a JSON object")
        if request.get("model") != self.name:
            raise RequestError(f"model {request.get('model')!r} is not served here; this server has {self.name!r}",
                               status=404, param="model", code="model_not_found")
        messages, images = parse_messages(request.get("messages"))
        params, seed = parse_params(request, self.default_max_tokens)
        with self._lock:
            (answer,) = generate(self.model, self.processor, [messages], [images], params, seed=seed, batch_size=1)
            prompt_tokens = encode_prompts(self.processor, [messages], [images])["input_ids"].shape[1]
        completion_tokens = len(self.processor.tokenizer(answer, add_special_tokens=False)["input_ids"])
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
            "model": self.name,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": answer},
                         "finish_reason": "length" if completion_tokens >= params.max_new_tokens else "stop"}],
            "usage": {"prompt_tokens": int(prompt_tokens), "completion_tokens": completion_tokens,
                      "total_tokens": int(prompt_tokens) + completion_tokens},
        }


def _handler(service: ChatService) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, fmt: str, *args: Any) -> None:
            logger.debug("%s %s", self.address_string(), fmt % args)

        def _send(self, status: int, body: dict[str, Any]) -> None:
            payload = json.dumps(body, ensure_ascii=False).encode("utf-8")
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def do_GET(self) -> None:
            if self.path.rstrip("/") == "/v1/models":
                self._send(200, service.models())
            else:
                self._send(404, RequestError(f"no route GET {self.path}", status=404).body())

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length)
            if self.path.rstrip("/") != "/v1/chat/completions":
                self._send(404, RequestError(f"no route POST {self.path}", status=404).body())
                return
            try:
                self._send(200, service.complete(json.loads(raw)))
            except (json.JSONDecodeError, UnicodeDecodeError) as err:
                self._send(400, RequestError(f"the body is not valid JSON: {err}").body())
            except RequestError as err:
                self._send(err.status, err.body())
            except Exception as err:  # a failure inside generation: logged with its traceback, reported as 500
                logger.exception("chat completion failed")
                self._send(500, {"error": {"message": f"internal error: {err!r}", "type": "server_error",
                                           "param": None, "code": None}})

    return Handler


def make_server(service: ChatService, host: str, port: int) -> ThreadingHTTPServer:
    """A bound (not yet serving) HTTP server; ``port`` 0 picks a free one (see ``server_address``)."""
    server = ThreadingHTTPServer((host, port), _handler(service))
    server.daemon_threads = True
    return server


@dataclass
class ServeConfig:
    """``mmalign serve``: the local model directory, where to listen, and what to call the model."""

    model: str = ""
    host: str = "127.0.0.1"
    port: int = 8000
    name: str = ""
    dtype: str | None = None
    device: str | None = None
    trust_remote_code: bool = False
    default_max_tokens: int = 256

    def __post_init__(self) -> None:
        if not 0 <= self.port < 65536 or self.default_max_tokens < 1:
            raise ValueError(f"need 0 <= port < 65536 and default_max_tokens >= 1, got {self.port}, "
                             f"{self.default_max_tokens}")


def serve(cfg: ServeConfig) -> None:
    """Load ``cfg.model`` and serve it until interrupted."""
    if not cfg.model:
        raise ValueError("serve needs model: a local model directory")
    model, processor = load_vlm(cfg.model, dtype=cfg.dtype, device=cfg.device,
                                trust_remote_code=cfg.trust_remote_code)
    service = ChatService(model, processor, cfg.name or Path(cfg.model).name, cfg.default_max_tokens)
    server = make_server(service, cfg.host, cfg.port)
    host, port = server.server_address[:2]
    logger.info("serving %r at http://%s:%d/v1 (chat/completions, models)", service.name, host, port)
    try:
        server.serve_forever()
    finally:
        server.server_close()
