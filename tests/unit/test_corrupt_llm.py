"""LLM corruption against fake OpenAI-compatible endpoints on 127.0.0.1: retries, backoff, rate limit,
key handling, on-disk cache (request counts), provenance, and the ``sample corrupt`` runner."""

import io
import json
import logging
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from PIL import Image

from mmalign.data.record_files import read_records, write_records
from mmalign.data.schema import PreferenceRecord
from mmalign.sampling.corrupt import (CorruptConfig, LLMCorruptionConfig, ResponseCache, corrupt_records, load_fewshot,
                                      question_text, run_corruption)
from mmalign.sampling.openai_client import ChatClient, ChatError, EndpointConfig


class FakeEndpoint:
    """A chat endpoint whose replies come from ``script(n, body) -> (status, headers, reply text)``."""

    def __init__(self, script):
        self.script, self.bodies, self.times, self.auth = script, [], [], []
        lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with lock:
                    outer.bodies.append(body)
                    outer.times.append(time.monotonic())
                    outer.auth.append(self.headers.get("Authorization"))
                    n = len(outer.bodies)
                status, headers, text = outer.script(n, body)
                payload = (json.dumps({"choices": [{"index": 0, "message": {"role": "assistant", "content": text}}]})
                           if status == 200 else json.dumps({"error": {"message": text}})).encode()
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def endpoint():
    servers = []

    def make(script):
        servers.append(FakeEndpoint(script))
        return servers[-1]

    yield make
    for s in servers:
        s.close()


def _ep(url, **kw):
    return EndpointConfig(**({"base_url": url, "model": "corrupter-1", "backoff_s": 0.05, "requests_per_s": 1000.0}
                             | kw))


MESSAGES = [{"role": "user", "content": "hi"}]


def test_retries_503_and_429_with_exponential_backoff(endpoint):
    fake = endpoint(lambda n, b: [(503, {}, "busy"), (429, {}, "slow down"), (200, {}, "ok!")][n - 1])
    client = ChatClient(_ep(fake.url, backoff_s=0.1))
    assert client.complete(MESSAGES, temperature=0.0, max_tokens=8, seed=3) == "ok!"
    assert len(fake.bodies) == 3 == client.requests_sent
    gaps = [b - a for a, b in zip(fake.times, fake.times[1:])]
    # waits of 0.1 * 2**0 then 0.1 * 2**1 (upper bounds loose: 2 shared cores)
    assert 0.1 <= gaps[0] < 0.6 and 0.2 <= gaps[1] < 0.7
    assert fake.bodies[0] == {"model": "corrupter-1", "messages": MESSAGES, "temperature": 0.0, "max_tokens": 8,
                              "seed": 3}


def test_retry_after_header_wins_over_a_shorter_backoff(endpoint):
    fake = endpoint(lambda n, b: (429, {"Retry-After": "0.3"}, "wait") if n == 1 else (200, {}, "done"))
    ChatClient(_ep(fake.url, backoff_s=0.01)).complete(MESSAGES, temperature=0.0, max_tokens=8, seed=0)
    assert fake.times[1] - fake.times[0] >= 0.3


def test_client_errors_are_not_retried_and_retries_end(endpoint):
    bad = endpoint(lambda n, b: (400, {}, "bad request: unknown field"))
    with pytest.raises(ChatError, match=r"HTTP 400 \(not retried\): .*unknown field"):
        ChatClient(_ep(bad.url)).complete(MESSAGES, temperature=0.0, max_tokens=8, seed=0)
    assert len(bad.bodies) == 1
    down = endpoint(lambda n, b: (500, {}, "boom"))
    with pytest.raises(ChatError, match="gave up after 3 attempts; last failure: HTTP 500"):
        ChatClient(_ep(down.url, max_retries=2, backoff_s=0.01)).complete(MESSAGES, temperature=0.0, max_tokens=8,
                                                                          seed=0)
    assert len(down.bodies) == 3


def test_connection_errors_are_retried():
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    client = ChatClient(_ep(f"http://127.0.0.1:{port}/v1", max_retries=2, backoff_s=0.01))
    with pytest.raises(ChatError, match="gave up after 3 attempts; last failure: connection error"):
        client.complete(MESSAGES, temperature=0.0, max_tokens=8, seed=0)
    assert client.requests_sent == 3


def test_rate_limit_spaces_requests_across_threads(endpoint, tmp_path):
    fake = endpoint(lambda n, b: (200, {}, f"corrupted {n}"))
    cfg = LLMCorruptionConfig(endpoint=_ep(fake.url, requests_per_s=10.0, max_workers=4))
    records = [PreferenceRecord(f"r{i}", [], f"Q{i}?", f"answer {i}", []) for i in range(6)]
    corrupt_records(records, cfg, seed=0, client=ChatClient(cfg.endpoint), cache=ResponseCache(tmp_path))
    times = sorted(fake.times)
    # Starts are scheduled 1/10 s apart; arrival jitter can shrink one gap, not the span of 5 intervals.
    assert len(times) == 6 and times[-1] - times[0] >= 0.4


def test_api_key_from_env_is_sent_but_never_logged(endpoint, monkeypatch, caplog):
    monkeypatch.setenv("MY_CORRUPT_KEY", "sk-very-secret-123")
    fake = endpoint(lambda n, b: (502, {}, "bad gateway") if n == 1 else (401, {}, "nope"))
    caplog.set_level(logging.DEBUG)
    with pytest.raises(ChatError) as err:
        ChatClient(_ep(fake.url, api_key_env="MY_CORRUPT_KEY")).complete(MESSAGES, temperature=0.0, max_tokens=8,
                                                                         seed=0)
    assert fake.auth == ["Bearer sk-very-secret-123"] * 2
    assert "sk-very-secret" not in caplog.text + str(err.value) and "502" in caplog.text
    monkeypatch.delenv("MY_CORRUPT_KEY")
    with pytest.raises(ValueError, match="'MY_CORRUPT_KEY'"):
        ChatClient(_ep(fake.url, api_key_env="MY_CORRUPT_KEY"))


def _records():
    return [PreferenceRecord("a", ["img.png"], "<image>\nWhat is on the table?", "A red cup and a book.", []),
            PreferenceRecord("b", ["img.png"], [{"role": "user", "content": [{"type": "image"}, {"type": "text",
                             "text": "Count the dogs."}]}], "There are two dogs.", ["There is one dog."]),
            PreferenceRecord("c", ["img.png"], "<image>\nColour of the car?", "Blue.", [])]


def _swap_script(n, body):
    answer = body["messages"][-1]["content"].split("Original answer: ")[1].split("\n")[0]
    replies = {"A red cup and a book.": "A blue mug and two books.", "There are two dogs.": "There are three dogs.",
               "Blue.": "Blue."}  # the last one is an unchanged reply -> skipped
    return 200, {}, replies[answer]


def test_corrupt_records_output_provenance_and_cache(endpoint, tmp_path):
    fake = endpoint(_swap_script)
    cfg = LLMCorruptionConfig(endpoint=_ep(fake.url))
    run = lambda c: corrupt_records(_records(), c, seed=7, client=ChatClient(c.endpoint),  # noqa: E731
                                    cache=ResponseCache(tmp_path / "cache"))
    out, summary = run(cfg)
    assert [r.id for r in out] == ["a", "b"]
    assert out[0].rejected == ["A blue mug and two books."] and out[0].chosen == "A red cup and a book."
    assert out[1].rejected == ["There are three dogs.", "There is one dog."]
    prompt = load_fewshot()
    corruption = out[0].meta["corruption"]
    assert {k: corruption[k] for k in ("method", "model", "temperature", "max_tokens", "seed", "prompt_sha256")} == {
        "method": "llm", "model": "corrupter-1", "temperature": 0.7, "max_tokens": 512, "seed": 7,
        "prompt_sha256": prompt.sha256}
    assert summary == {"records": 3, "written": 2, "calls": 3, "cache_hits": 0, "skipped_ids": ["c"]}
    body = fake.bodies[0]
    assert len(body["messages"]) == 2 + 2 * len(prompt.examples) and body["messages"][0]["role"] == "system"
    assert sorted(b["messages"][-1]["content"].split("\n")[0] for b in fake.bodies) == [
        "Question: Colour of the car?", "Question: Count the dogs.", "Question: What is on the table?"]
    # A rerun sends nothing and gives the same records; a changed setting sends everything again.
    again, summary2 = run(cfg)
    assert len(fake.bodies) == 3 and summary2["calls"] == 0 and summary2["cache_hits"] == 3
    assert [(r.rejected, r.meta) for r in again] == [(r.rejected, r.meta) for r in out]
    run(LLMCorruptionConfig(endpoint=_ep(fake.url), temperature=0.2))
    assert len(fake.bodies) == 6


def test_a_run_that_dies_midway_resumes_from_the_cache(endpoint, tmp_path):
    records = [PreferenceRecord(f"r{i}", [], f"Q{i}?", f"answer {i}", []) for i in range(10)]
    dying = endpoint(lambda n, b: (200, {}, "wrong " + b["messages"][-1]["content"][-30:]) if n <= 4
                     else (403, {}, "quota exhausted"))
    cfg = LLMCorruptionConfig(endpoint=_ep(dying.url, max_workers=1))
    with pytest.raises(ChatError, match="quota exhausted"):
        corrupt_records(records, cfg, seed=0, client=ChatClient(cfg.endpoint), cache=ResponseCache(tmp_path))
    assert len(dying.bodies) <= 6  # the 5th fails; at most the one request already taken by the worker follows
    healthy = endpoint(lambda n, b: (200, {}, "wrong " + b["messages"][-1]["content"][-30:]))
    cfg = LLMCorruptionConfig(endpoint=_ep(healthy.url, max_workers=3))
    out, summary = corrupt_records(records, cfg, seed=0, client=ChatClient(cfg.endpoint), cache=ResponseCache(tmp_path))
    assert len(healthy.bodies) == 6 and summary["cache_hits"] == 4 and len(out) == 10


def test_question_text_and_prompt_file_checks(tmp_path):
    assert question_text("<image>\nWhat is shown?") == "What is shown?"
    assert question_text([{"role": "system", "content": "Be brief."},
                          {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Name it."}]}]
                         ) == "Name it."
    bad = tmp_path / "p.json"
    bad.write_text(json.dumps({"system": "s", "user_template": "Answer: {answer}", "examples": []}))
    with pytest.raises(ValueError, match=r"p.json: user_template must contain \{question\}"):
        load_fewshot(bad)
    bad.write_text(json.dumps({"system": "s", "user_template": "{question} {answer}", "examples": [{"question": "q"}]}))
    with pytest.raises(ValueError, match=r"examples\[0\] needs"):
        load_fewshot(bad)


def test_run_corruption_llm_and_lab_write_valid_files(endpoint, tmp_path):
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (255, 0, 0)).save(buf, format="PNG")
    (tmp_path / "img.png").write_bytes(buf.getvalue())
    write_records(tmp_path / "in.jsonl", _records())
    fake = endpoint(_swap_script)
    cfg = CorruptConfig(input=str(tmp_path / "in.jsonl"), output=str(tmp_path / "out" / "llm.jsonl"), seed=1,
                        llm=LLMCorruptionConfig(endpoint=_ep(fake.url)))
    assert run_corruption(cfg)["written"] == 2
    out = read_records(tmp_path / "out" / "llm.jsonl", data_root=tmp_path, min_rejected=1)
    assert [r.rejected[0] for r in out] == ["A blue mug and two books.", "There are three dogs."]
    assert len(list((tmp_path / "out" / "corrupt_cache").rglob("*.json"))) == 3
    sidecar = json.loads((tmp_path / "out" / "llm.jsonl.provenance.json").read_text())
    assert sidecar["sampler"] == "corrupt_llm" and sidecar["count"] == 2 and sidecar["summary"]["calls"] == 3

    lab = [PreferenceRecord("s0", ["img.png"], "<image>\nDescribe the image.",
                            "There is a red circle and a green cross.", [], meta={"objects": ["red circle", "green cross"]})]
    write_records(tmp_path / "lab.jsonl", lab)
    (tmp_path / "bias.json").write_text(json.dumps({"pairs": [["red circle", "blue square"]], "p": 0.9}))
    run_corruption(CorruptConfig(input=str(tmp_path / "lab.jsonl"), output=str(tmp_path / "lab_pairs.jsonl"),
                                 method="lab", lab_dir=str(tmp_path)))
    (rec,) = read_records(tmp_path / "lab_pairs.jsonl", min_rejected=1)
    assert rec.rejected == ["There is a red circle and a blue square."]
    with pytest.raises(ValueError, match="bias.json"):
        run_corruption(CorruptConfig(input=str(tmp_path / "lab.jsonl"), output=str(tmp_path / "x.jsonl"),
                                     method="lab", lab_dir=str(tmp_path / "nowhere")))
