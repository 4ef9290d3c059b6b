"""The chat client keeps its API key to ``base_url`` (no redirects followed, none echoed back in errors or logs)
and ``timeout_s`` is a deadline for the whole attempt, even against a server that trickles bytes."""

from __future__ import annotations

import json
import logging
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from mmalign.sampling.openai_client import ChatClient, ChatError, EndpointConfig

KEY = "sk-test-SECRET-0123456789"
REPLY = json.dumps({"choices": [{"message": {"content": "ok"}}]}).encode()


class _Server:
    """A local HTTP server answering POSTs with ``respond(handler)``; records each request's headers."""

    def __init__(self, respond):
        self.requests: list[dict[str, str]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server's naming
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                outer.requests.append(dict(self.headers))
                respond(self)

            def do_GET(self):  # noqa: N802
                outer.requests.append(dict(self.headers))
                self.send_response(404)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def servers():
    made = []

    def make(respond):
        made.append(_Server(respond))
        return made[-1]

    yield make
    for server in made:
        server.close()


def _client(url, monkeypatch, **kwargs):
    monkeypatch.setenv("TEST_KEY", KEY)
    return ChatClient(EndpointConfig(base_url=url + "/v1", model="m", api_key_env="TEST_KEY", backoff_s=0.0,
                                     requests_per_s=1000.0, **kwargs))


def _ask(client):
    return client.complete([{"role": "user", "content": "hi"}], temperature=0.0, max_tokens=4, seed=0)


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
def test_a_redirect_to_another_host_is_not_followed_and_the_key_goes_nowhere_else(servers, monkeypatch, status):
    other = servers(lambda h: (h.send_response(200), h.end_headers(), h.wfile.write(REPLY)))

    def redirect(handler):
        handler.send_response(status)
        handler.send_header("Location", other.url + "/v1/chat/completions")
        handler.send_header("Content-Length", "0")
        handler.end_headers()

    first = servers(redirect)
    with pytest.raises(ChatError, match=rf"HTTP {status}, a redirect to host 127\.0\.0\.1:\d+; redirects are not "
                                        "followed"):
        _ask(_client(first.url, monkeypatch))
    assert first.requests[0]["Authorization"] == f"Bearer {KEY}"
    assert other.requests == []


def _echo_headers(status):
    def respond(handler):
        body = json.dumps({"error": "bad request", "authorization": handler.headers["Authorization"],
                           "you_sent": dict(handler.headers)}).encode()
        handler.send_response(status)
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body)

    return respond


@pytest.mark.parametrize("status", [400, 503])
def test_an_error_body_echoing_the_key_is_redacted_in_errors_and_logs(servers, monkeypatch, caplog, status):
    server = servers(_echo_headers(status))
    with caplog.at_level(logging.DEBUG), pytest.raises(ChatError) as info:
        _ask(_client(server.url, monkeypatch, max_retries=1))
    assert "Bearer [api key]" in str(info.value)
    assert KEY[:12] not in str(info.value) and KEY[:12] not in caplog.text  # nor a piece cut by truncation


def test_timeout_is_a_deadline_for_the_whole_reply_not_per_read(servers, monkeypatch):
    stop = threading.Event()

    def trickle(handler):  # headers at once, then one byte every 0.1 s: each read returns well within 1 s
        handler.send_response(200)
        handler.send_header("Content-Length", str(len(REPLY)))
        handler.end_headers()
        for byte in REPLY:
            if stop.is_set():
                return
            handler.wfile.write(bytes([byte]))
            handler.wfile.flush()
            time.sleep(0.1)

    server = servers(trickle)
    started = time.monotonic()
    with pytest.raises(ChatError, match=r"gave up after 2 attempts; last failure: connection error: no complete "
                                        r"reply within timeout_s=0\.6"):
        _ask(_client(server.url, monkeypatch, timeout_s=0.6, max_retries=1))
    elapsed = time.monotonic() - started
    stop.set()
    assert elapsed < 2.5, elapsed  # 2 attempts x 0.6 s; the reply alone takes ~5 s, a per-read timeout never fires
    fast = servers(lambda h: (h.send_response(200), h.send_header("Content-Length", str(len(REPLY))),
                              h.end_headers(), h.wfile.write(REPLY)))
    assert _ask(_client(fast.url, monkeypatch, timeout_s=0.6)) == "ok"
