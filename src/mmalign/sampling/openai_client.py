"""A minimal client for OpenAI-compatible ``/chat/completions`` endpoints, standard library only.

Used by the LLM corrupter (and usable by API judges): retries with exponential backoff on HTTP 429,
5xx and connection errors (honouring ``Retry-After``), a process-wide request rate limit shared by all
worker threads, and an API key read from an environment variable whose *name* is configured.

The key is sent only in the ``Authorization`` header of requests to ``base_url`` and never appears in logs,
errors or saved configs: redirects are not followed (a chat POST cannot be redirected without losing its
body, and following one would hand the key to whatever host the ``Location`` names), and any reply text
quoted in an error has the key blanked out, in case a server echoes request headers. ``timeout_s`` bounds
each attempt as a whole (connect, send, headers and body): a watchdog closes the socket at the deadline, so
a server trickling bytes cannot stretch it the way a per-read socket timeout would.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import logging
import os
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger(__name__)


class ChatError(RuntimeError):
    """A chat request that failed for good: a non-retryable status, a malformed reply, or retries exhausted."""


@dataclass
class EndpointConfig:
    """Where and how to call a chat model.

    ``base_url`` ends before ``/chat/completions`` (e.g. ``https://api.openai.com/v1`` or
    ``http://127.0.0.1:8000/v1`` for ``mmalign serve``). ``api_key_env`` names the environment variable
    holding the key ("" sends no key). ``timeout_s``: the most one attempt may take in all, connect to last byte.
    Attempt ``i`` (0-based) that fails retryably waits
    ``min(max_backoff_s, backoff_s * 2**i)`` (or ``Retry-After`` if longer) before the next one.
    """

    base_url: str = ""  # URL up to /chat/completions, e.g. http://127.0.0.1:8000/v1 for mmalign serve
    model: str = ""  # model name sent with each request
    api_key_env: str = ""  # environment variable holding the API key ("": send none)
    timeout_s: float = 120.0  # seconds one request may take
    max_retries: int = 6  # retries of a failed request (429, 5xx, timeouts)
    backoff_s: float = 1.0  # first retry delay, doubled per attempt
    max_backoff_s: float = 60.0  # longest retry delay
    requests_per_s: float = 2.0  # client-side rate limit
    max_workers: int = 4  # requests in flight at once

    def __post_init__(self) -> None:
        if self.max_retries < 0 or self.max_workers < 1:
            raise ValueError("need max_retries >= 0 and max_workers >= 1")
        if min(self.timeout_s, self.requests_per_s) <= 0 or min(self.backoff_s, self.max_backoff_s) < 0:
            raise ValueError("need timeout_s > 0, requests_per_s > 0, backoff_s >= 0 and max_backoff_s >= 0")


class RateLimiter:
    """Spaces request starts at least ``1 / per_second`` apart across all threads."""

    def __init__(self, per_second: float):
        self._interval = 1.0 / per_second
        self._next = 0.0
        self._lock = threading.Lock()

    def wait(self) -> None:
        with self._lock:
            now = time.monotonic()
            start = max(now, self._next)
            self._next = start + self._interval
        if start > now:
            time.sleep(start - now)


def _retry_after(headers: Any) -> float | None:
    """Seconds from a numeric ``Retry-After`` header (the HTTP-date form is not used by chat APIs)."""
    value = headers.get("Retry-After") if headers is not None else None
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


class _Deadline:
    """Shuts down every socket an attempt opens once ``seconds`` have passed since it started."""

    def __init__(self, seconds: float):
        self.seconds, self.expired = seconds, False
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._timer = threading.Timer(seconds, self._expire)
        self._timer.daemon = True
        self._timer.start()

    def _expire(self) -> None:
        with self._lock:
            self.expired = True
            for sock in self._sockets:
                with contextlib.suppress(OSError):  # already closed by the request itself
                    sock.shutdown(socket.SHUT_RDWR)

    def watch(self, sock: socket.socket) -> None:
        with self._lock:
            self._sockets.append(sock)
            if self.expired:
                sock.shutdown(socket.SHUT_RDWR)

    def cancel(self) -> None:
        self._timer.cancel()

    def connection(self, base: type[http.client.HTTPConnection]) -> type[http.client.HTTPConnection]:
        """``base`` whose sockets this deadline watches."""
        deadline = self

        class Watched(base):  # type: ignore[misc, valid-type]
            def connect(self) -> None:
                super().connect()
                deadline.watch(self.sock)

        return Watched


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """Hand 3xx replies back as errors instead of following them (with the key) to another URL."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


def _opener(deadline: _Deadline) -> urllib.request.OpenerDirector:
    """An opener (proxies from the environment as usual) whose connections ``deadline`` watches."""

    class HTTP(urllib.request.HTTPHandler):
        def http_open(self, req: urllib.request.Request) -> Any:
            return self.do_open(deadline.connection(http.client.HTTPConnection), req)

    class HTTPS(urllib.request.HTTPSHandler):
        def https_open(self, req: urllib.request.Request) -> Any:
            return self.do_open(deadline.connection(http.client.HTTPSConnection), req, context=self._context)

    return urllib.request.build_opener(_NoRedirect, HTTP, HTTPS)


class ChatClient:
    """Thread-safe chat-completions caller for one ``EndpointConfig``."""

    def __init__(self, endpoint: EndpointConfig):
        if not endpoint.base_url.startswith(("http://", "https://")) or not endpoint.model:
            raise ValueError(f"endpoint needs an http(s) base_url and a model, got base_url={endpoint.base_url!r} "
                             f"model={endpoint.model!r}")
        self.endpoint = endpoint
        self._url = endpoint.base_url.rstrip("/") + "/chat/completions"
        self._headers = {"Content-Type": "application/json"}
        self._key = ""
        if endpoint.api_key_env:
            key = os.environ.get(endpoint.api_key_env)
            if not key:
                raise ValueError(f"environment variable {endpoint.api_key_env!r} (endpoint.api_key_env) is unset or "
                                 "empty")
            self._key = key
            self._headers["Authorization"] = f"Bearer {key}"
        self._limiter = RateLimiter(endpoint.requests_per_s)
        self._count_lock = threading.Lock()
        self.requests_sent = 0

    def _redact(self, text: str) -> str:
        """``text`` with the API key blanked out (a server may echo the request's headers in an error)."""
        return text.replace(self._key, "[api key]") if self._key else text

    def _post(self, payload: bytes) -> tuple[int, Any, str]:
        """One HTTP attempt within ``timeout_s`` in all -> (status, headers, body text); connection problems and
        the deadline raise OSError/HTTPException."""
        request = urllib.request.Request(self._url, data=payload, headers=self._headers, method="POST")
        with self._count_lock:
            self.requests_sent += 1
        deadline = _Deadline(self.endpoint.timeout_s)
        try:
            with _opener(deadline).open(request, timeout=self.endpoint.timeout_s) as response:
                result = response.status, response.headers, response.read().decode("utf-8", errors="replace")
        except urllib.error.HTTPError as err:
            result = err.code, err.headers, err.read().decode("utf-8", errors="replace")
        except (OSError, http.client.HTTPException) as err:
            if deadline.expired:
                raise TimeoutError(f"no complete reply within timeout_s={self.endpoint.timeout_s:g}") from err
            raise
        finally:
            deadline.cancel()
        if deadline.expired:  # the socket was shut down mid-body: what was read is cut short
            raise TimeoutError(f"no complete reply within timeout_s={self.endpoint.timeout_s:g}")
        return result

    def complete(self, messages: list[dict[str, Any]], *, temperature: float, max_tokens: int, seed: int) -> str:
        """The assistant text for ``messages`` (OpenAI chat format), retrying transient failures."""
        body = {"model": self.endpoint.model, "messages": messages, "temperature": temperature,
                "max_tokens": max_tokens, "seed": seed}
        payload = json.dumps(body).encode("utf-8")
        ep = self.endpoint
        attempt = 0
        while True:
            self._limiter.wait()
            wait_hint = None
            try:
                status, headers, text = self._post(payload)
            except (OSError, http.client.HTTPException) as err:  # URLError, refused, reset, timeout
                failure = f"connection error: {self._redact(str(err))}"
            else:
                text = self._redact(text)
                if status == 200:
                    return _parse_reply(text, self._url)
                if 300 <= status < 400:
                    target = urllib.parse.urlsplit(headers.get("Location") or "").netloc or "?"
                    raise ChatError(f"{self._url} answered HTTP {status}, a redirect to host {target}; redirects "
                                    "are not followed (the API key goes to base_url only): set base_url to the "
                                    "final address")
                if status != 429 and status < 500:
                    raise ChatError(f"{self._url} answered HTTP {status} (not retried): {text[:500]}")
                failure, wait_hint = f"HTTP {status}: {text[:200]}", _retry_after(headers)
            if attempt == ep.max_retries:
                raise ChatError(f"{self._url}: gave up after {attempt + 1} attempts; last failure: {failure}")
            delay = min(ep.max_backoff_s, ep.backoff_s * 2**attempt)
            if wait_hint is not None:
                delay = max(delay, min(wait_hint, ep.max_backoff_s))
            logger.warning("%s: attempt %d failed (%s); retrying in %.2fs", self._url, attempt + 1, failure, delay)
            time.sleep(delay)
            attempt += 1


def _parse_reply(text: str, url: str) -> str:
    try:
        reply = json.loads(text)
        content = reply["choices"][0]["message"]["content"]
    except (json.JSONDecodeError, KeyError, IndexError, TypeError) as err:
        raise ChatError(f"{url}: malformed chat completion ({err!r}): {text[:300]}") from err
    if not isinstance(content, str):
        raise ChatError(f"{url}: message content is {type(content).__name__}, expected a string")
    return content
