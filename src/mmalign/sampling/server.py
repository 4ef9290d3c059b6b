"""An OpenAI-compatible chat server over one local model: ``POST /v1/chat/completions``, ``GET /v1/models``.

So users can run their own corrupter or judge on a local checkpoint, and so the API client is tested against
a real server (the request semantics are ``mmalign.sampling.chat_service``). HTTP side:

- ``stream: true`` answers with server-sent events in OpenAI's chunk format, ending with ``data: [DONE]``, and
  closes the connection after it;
- an optional API key: with ``api_key_env`` set, every request needs ``Authorization: Bearer <key>`` (else 401);
- limits: the body (``max_body_mb``; a missing or bad ``Content-Length`` is 411 / 400, chunked bodies 411), the
  tokens and choices a request may ask for, ``workers`` threads that handle requests (the model itself runs
  one generation at a time), ``max_connections`` open connections (more are closed at once);
- idle connections cost no thread: a connection waits in one watcher thread until it sends bytes and is closed
  after ``idle_timeout_s`` of silence; a request that stalls mid-way is dropped after ``idle_timeout_s``. So 300
  half-open connections leave the thread count at ``workers`` + 2.
"""

from __future__ import annotations

import hmac
import json
import logging
import os
import selectors
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

from mmalign.models.loading import load_vlm
from mmalign.sampling.chat_service import ChatService, Limits, RequestError

logger = logging.getLogger(__name__)


@dataclass
class ServeConfig:
    """``mmalign serve``: the local model, where to listen, what to call it, and the request limits."""

    model: str = ""  # local model folder (save_pretrained layout)
    host: str = "127.0.0.1"  # address to bind (0.0.0.0: every interface; set api_key_env then)
    port: int = 8000  # port to listen on (0: a free one, logged)
    name: str = ""  # model id clients send ("": the model folder's name)
    dtype: str | None = None  # weights dtype: float32 / bfloat16 / float16 / auto (None: float32)
    device: str | None = None  # device to run on, e.g. cuda:0 (None: CPU)
    trust_remote_code: bool = False  # allow model code shipped inside the folder
    default_max_tokens: int = 256  # tokens per answer when a request sets no max_tokens
    max_tokens: int = 4096  # most tokens a request may ask for per answer
    max_n: int = 8  # most choices (n) per request
    api_key_env: str = ""  # environment variable holding the key clients must send as a bearer token ("": none)
    max_body_mb: float = 32.0  # largest request body (inline images included)
    workers: int = 8  # threads handling requests at once
    max_connections: int = 256  # open connections at most; more are closed on arrival
    idle_timeout_s: float = 30.0  # close a connection silent this long (before or inside a request)

    def __post_init__(self) -> None:
        if not 0 <= self.port < 65536:
            raise ValueError(f"port must be in [0, 65536), got {self.port}")
        if not 1 <= self.default_max_tokens <= self.max_tokens or self.max_n < 1:
            raise ValueError("need 1 <= default_max_tokens <= max_tokens and max_n >= 1")
        if self.max_body_mb <= 0 or self.workers < 1 or self.max_connections < 1 or self.idle_timeout_s <= 0:
            raise ValueError("max_body_mb, workers, max_connections and idle_timeout_s must be > 0")


def _handler(service: ChatService, api_key: str, max_body: int, timeout: float) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def setup(self) -> None:
            self.timeout = timeout  # per read: a request that stalls mid-way is dropped
            super().setup()

        def handle(self) -> None:
            # One request per hand-over: a kept-alive connection goes back to the watcher, not a waiting thread.
            self.handle_one_request()

        def log_message(self, fmt: str, *args: Any) -> None:
            logger.debug("%s %s", self.address_string(), fmt % args)

        def _send(self, status: int, body: dict[str, Any]) -> None:
            payload = json.dumps(body, ensure_ascii=False).encode("utf-8")
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def _authorized(self) -> bool:
            if not api_key:
                return True
            given = self.headers.get("Authorization", "")
            if given.startswith("Bearer ") and hmac.compare_digest(given[7:].encode(), api_key.encode()):
                return True
            self._send(401, RequestError("missing or wrong API key (Authorization: Bearer ...)", status=401,
                                         code="invalid_api_key").body())
            return False

        def do_GET(self) -> None:
            if not self._authorized():
                return
            if self.path.rstrip("/") == "/v1/models":
                self._send(200, service.models())
            else:
                self._send(404, RequestError(f"no route GET {self.path}", status=404).body())

        def _body(self) -> bytes | None:
            """The request body, or None after an error reply (the connection is then closed)."""
            length = self.headers.get("Content-Length")
            error = None
            if self.headers.get("Transfer-Encoding") or length is None:
                error = RequestError("send the body with a Content-Length (no chunked encoding)", status=411)
            elif not length.strip().isdigit():
                error = RequestError(f"bad Content-Length {length[:40]!r}", status=400)
            elif int(length) > max_body:
                error = RequestError(f"body of {int(length)} bytes exceeds the limit of {max_body}", status=413)
            if error is None:
                return self.rfile.read(int(length))
            self.close_connection = True  # the unread body must not be taken for the next request
            self._send(error.status, error.body())
            return None

        def do_POST(self) -> None:
            raw = self._body()
            if raw is None or not self._authorized():
                return
            if self.path.rstrip("/") != "/v1/chat/completions":
                self._send(404, RequestError(f"no route POST {self.path}", status=404).body())
                return
            try:
                body = json.loads(raw)
                if isinstance(body, dict) and body.get("stream") is True:
                    self._stream(*service.prepare(body))
                else:
                    self._send(200, service.complete(body))
            except (json.JSONDecodeError, UnicodeDecodeError) as err:
                self._send(400, RequestError(f"the body is not valid JSON: {err}").body())
            except RequestError as err:
                self._send(err.status, err.body())
            except (BrokenPipeError, ConnectionResetError, TimeoutError):
                self.close_connection = True  # the client went away mid-answer
            except Exception as err:  # a failure inside generation: logged with its traceback, reported as 500
                logger.exception("chat completion failed")
                self._send(500, {"error": {"message": f"internal error: {err!r}", "type": "server_error",
                                           "param": None, "code": None}})

        def _stream(self, request: Any, messages: list, images: list) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-cache")
            self.send_header("Connection", "close")
            self.end_headers()
            self.close_connection = True

            def emit(chunk: dict[str, Any]) -> None:
                self.wfile.write(f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n".encode("utf-8"))
                self.wfile.flush()

            try:
                service.stream(request, messages, images, emit)
            except (BrokenPipeError, ConnectionResetError, TimeoutError):
                raise
            except Exception as err:  # headers are sent: the error goes out as the stream's last event
                logger.exception("streamed chat completion failed")
                emit({"error": {"message": f"internal error: {err!r}", "type": "server_error", "param": None,
                                "code": None}})
            self.wfile.write(b"data: [DONE]\n\n")

    return Handler


class ChatServer(HTTPServer):
    """``HTTPServer`` whose connections wait in one watcher thread until readable, then get a pool thread for
    one request; kept-alive connections come back to the watcher (see the module docstring)."""

    request_queue_size = 128  # listen backlog: a burst of connections is accepted, not left in SYN retries

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler], *, workers: int,
                 max_connections: int, idle_timeout_s: float):
        super().__init__(address, handler)
        self.max_connections, self.idle_timeout_s = max_connections, idle_timeout_s
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="mmalign-serve")
        self.selector = selectors.DefaultSelector()
        self.waiting: dict[socket.socket, float] = {}  # idle connection -> deadline
        self.open = 0
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.watcher = threading.Thread(target=self._watch, name="mmalign-serve-watch", daemon=True)
        self.watcher.start()

    def process_request(self, request: socket.socket, client_address: Any) -> None:
        with self.lock:
            if self.open >= self.max_connections:
                logger.warning("connection from %s refused: %d connections open", client_address, self.open)
                self.shutdown_request(request)
                return
            self.open += 1
        self._park(request)

    def _park(self, request: socket.socket) -> None:
        with self.lock:
            self.waiting[request] = time.monotonic() + self.idle_timeout_s
            self.selector.register(request, selectors.EVENT_READ)

    def _close(self, request: socket.socket) -> None:
        with self.lock:
            self.open -= 1
        self.shutdown_request(request)

    def _watch(self) -> None:
        while not self.stopping.is_set():
            with self.lock:
                empty = not self.waiting
            events = [] if empty else self.selector.select(timeout=0.2)
            if empty:
                time.sleep(0.05)
            now = time.monotonic()
            with self.lock:
                ready = [key.fileobj for key, _ in events]
                expired = [s for s, deadline in self.waiting.items() if deadline < now and s not in ready]
                for sock in ready + expired:
                    self.selector.unregister(sock)
                    del self.waiting[sock]
            for sock in expired:
                self._close(sock)
            for sock in ready:
                self.pool.submit(self._serve_one, sock)

    def _serve_one(self, request: socket.socket) -> None:
        handler = None
        try:
            handler = self.RequestHandlerClass(request, request.getpeername(), self)
        except OSError:  # the client vanished before or during its request
            logger.debug("connection dropped", exc_info=True)
        except Exception:  # a bug in a handler must not leak the connection or kill the worker
            logger.exception("request handling failed")
        if handler is None or handler.close_connection:
            self._close(request)
        else:
            self._park(request)

    def server_close(self) -> None:
        self.stopping.set()
        super().server_close()
        self.pool.shutdown(wait=False, cancel_futures=True)
        with self.lock:
            for sock in list(self.waiting):
                self.selector.unregister(sock)
                sock.close()
            self.waiting.clear()


def make_server(service: ChatService, host: str, port: int, *, api_key: str = "", max_body_mb: float = 32.0,
                workers: int = 8, max_connections: int = 256, idle_timeout_s: float = 30.0) -> ChatServer:
    """A bound (not yet serving) server; ``port`` 0 picks a free one (see ``server_address``)."""
    handler = _handler(service, api_key, int(max_body_mb * 2**20), idle_timeout_s)
    return ChatServer((host, port), handler, workers=workers, max_connections=max_connections,
                      idle_timeout_s=idle_timeout_s)


def _api_key(cfg: ServeConfig) -> str:
    if not cfg.api_key_env:
        return ""
    key = os.environ.get(cfg.api_key_env, "")
    if not key:
        raise ValueError(f"api_key_env: environment variable {cfg.api_key_env} is not set or empty")
    return key


def serve(cfg: ServeConfig) -> None:
    """Load ``cfg.model`` and serve it until interrupted."""
    if not cfg.model:
        raise ValueError("serve needs model: a local model directory")
    api_key = _api_key(cfg)
    model, processor = load_vlm(cfg.model, dtype=cfg.dtype, device=cfg.device,
                                trust_remote_code=cfg.trust_remote_code)
    service = ChatService(model, processor, cfg.name or Path(cfg.model).name, cfg.default_max_tokens,
                          Limits(cfg.max_tokens, cfg.max_n))
    server = make_server(service, cfg.host, cfg.port, api_key=api_key, max_body_mb=cfg.max_body_mb,
                         workers=cfg.workers, max_connections=cfg.max_connections, idle_timeout_s=cfg.idle_timeout_s)
    host, port = server.server_address[:2]
    logger.info("serving %r at http://%s:%d/v1 (chat/completions, models)%s", service.name, host, port,
                "; API key required" if api_key else "")
    try:
        server.serve_forever()
    finally:
        server.server_close()
