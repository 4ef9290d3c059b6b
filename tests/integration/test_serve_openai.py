"""``mmalign serve`` with the official ``openai`` client: streaming (SSE chunks), ``n``, ``stop``, ``logprobs``,
``response_format``, the API key; and the HTTP limits (body size, bad Content-Length, idle and half-open
connections) with raw sockets."""

import socket
import threading
import time

import pytest

from mmalign.data.collate import encode_prompts
from mmalign.models.loading import load_vlm
from mmalign.sampling.chat_service import ChatService, RequestError, _check_json_object
from mmalign.sampling.generate import GenerationParams, generate
from mmalign.sampling.server import make_server

openai = pytest.importorskip("openai")
pytestmark = pytest.mark.integration

NAME = "tiny-llava"
HI = [{"role": "user", "content": "Describe the picture in detail."}]


@pytest.fixture(scope="module")
def model_and_processor(tiny_vlm_dir):
    return load_vlm(tiny_vlm_dir("llava"))


def _start(service, **kw):
    server = make_server(service, "127.0.0.1", 0, **kw)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    return server, f"http://127.0.0.1:{server.server_address[1]}/v1"


def _stop(server):
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def served(model_and_processor):
    model, processor = model_and_processor
    server, url = _start(ChatService(model, processor, NAME, default_max_tokens=16), workers=2)
    yield url, model, processor
    _stop(server)


def _client(url, key="unused"):
    return openai.OpenAI(base_url=url, api_key=key, max_retries=0, timeout=120)


def _generate(model, processor, seed, temperature, max_tokens=16):
    prompt = [{"role": "user", "content": [{"type": "text", "text": HI[0]["content"]}]}]
    (text,) = generate(model, processor, [prompt], [[]], GenerationParams(max_new_tokens=max_tokens,
                                                                          temperature=temperature), seed=seed)
    return text


def test_completion_matches_generate_with_exact_token_counts(served):
    url, model, processor = served
    reply = _client(url).chat.completions.create(model=NAME, messages=HI, temperature=0, max_tokens=12)
    assert reply.choices[0].message.content == _generate(model, processor, 0, 0.0, 12)
    prompt = [{"role": "user", "content": [{"type": "text", "text": HI[0]["content"]}]}]
    inputs = encode_prompts(processor, [prompt], [[]])
    out = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    assert reply.usage.prompt_tokens == inputs["input_ids"].shape[1]
    assert reply.usage.completion_tokens == out.shape[1] - inputs["input_ids"].shape[1]
    assert reply.choices[0].finish_reason == ("length" if reply.usage.completion_tokens == 12 else "stop")


def test_stream_delivers_the_same_text_as_a_plain_request_per_choice(served):
    url, _, _ = served
    client = _client(url)
    kw = {"model": NAME, "messages": HI, "temperature": 1.0, "max_tokens": 16, "seed": 7, "n": 2}
    plain = client.chat.completions.create(**kw)
    pieces, finish, usage, roles = {0: [], 1: []}, {}, None, []
    for chunk in client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}):
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            if choice.delta.role:
                roles.append(choice.index)
            pieces[choice.index].append(choice.delta.content or "")
            if choice.finish_reason:
                finish[choice.index] = choice.finish_reason
    assert roles == [0, 1]
    assert sum(len(p) for p in pieces.values()) > 4  # it arrived in pieces, not as one block
    for i in (0, 1):
        assert "".join(pieces[i]) == plain.choices[i].message.content
        assert finish[i] == plain.choices[i].finish_reason
    assert usage.completion_tokens == plain.usage.completion_tokens
    assert plain.choices[0].message.content != plain.choices[1].message.content  # sampled with seed 7 and 8


def test_choice_i_is_seeded_with_seed_plus_i(served):
    url, model, processor = served
    reply = _client(url).chat.completions.create(model=NAME, messages=HI, temperature=1.0, max_tokens=16, seed=3,
                                                 n=3)
    assert [c.message.content for c in reply.choices] == [_generate(model, processor, s, 1.0) for s in (3, 4, 5)]
    assert [c.index for c in reply.choices] == [0, 1, 2]


def test_stop_cuts_before_the_first_stop_string_streamed_or_not(served):
    url, model, processor = served
    client = _client(url)
    full = _generate(model, processor, 0, 0.0, 24)
    words = full.split()
    assert len(words) >= 3, full
    stop = words[2]
    expected = full[:full.index(stop)].rstrip()
    reply = client.chat.completions.create(model=NAME, messages=HI, temperature=0, max_tokens=24, stop=[stop, "zzq"])
    assert reply.choices[0].message.content == expected
    assert reply.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model=NAME, messages=HI, temperature=0, max_tokens=24, stop=stop, stream=True) if c.choices)
    assert streamed == expected


def test_logprobs_of_a_greedy_answer_are_the_top_alternatives(served):
    url, _, processor = served
    reply = _client(url).chat.completions.create(model=NAME, messages=HI, temperature=0, max_tokens=10,
                                                 logprobs=True, top_logprobs=3)
    content = reply.choices[0].logprobs.content
    assert content and all(len(t.top_logprobs) == 3 for t in content)
    for token in content:  # greedy decoding picked the likeliest token each time
        assert token.logprob == pytest.approx(token.top_logprobs[0].logprob, abs=1e-4)
        assert token.logprob <= 0 and token.top_logprobs[0].logprob >= token.top_logprobs[2].logprob
        assert bytes(token.bytes).decode() == token.token
    assert "".join(t.token for t in content).strip() == reply.choices[0].message.content


def test_json_object_answers_are_checked_not_constrained(served):
    url, _, _ = served
    with pytest.raises(openai.UnprocessableEntityError) as err:  # a random tiny model writes no JSON
        _client(url).chat.completions.create(model=NAME, messages=HI, temperature=0, max_tokens=8,
                                             response_format={"type": "json_object"})
    assert err.value.code == "invalid_json_output"
    _check_json_object('{"answer": "a red circle"}', 0)
    for text in ("[1, 2]", "not json", '{"a": '):
        with pytest.raises(RequestError, match="not a JSON object"):
            _check_json_object(text, 0)


def test_api_key_is_required_when_configured(model_and_processor):
    model, processor = model_and_processor
    server, url = _start(ChatService(model, processor, NAME, default_max_tokens=4), api_key="s3cret", workers=1)
    try:
        with pytest.raises(openai.AuthenticationError):
            _client(url, "wrong").models.list()
        with pytest.raises(openai.AuthenticationError):
            _client(url, "wrong").chat.completions.create(model=NAME, messages=HI, max_tokens=2)
        assert [m.id for m in _client(url, "s3cret").models.list()] == [NAME]
        assert _client(url, "s3cret").chat.completions.create(model=NAME, messages=HI, max_tokens=2).choices
    finally:
        _stop(server)


def _raw(port, data, timeout=10.0):
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    return reply


@pytest.mark.parametrize("headers, status", [
    (b"Content-Length: abc\r\n", b"400"),
    (b"Content-Length: -5\r\n", b"400"),
    (b"Content-Length: 99999999999\r\n", b"413"),
    (b"Transfer-Encoding: chunked\r\n", b"411"),
    (b"", b"411"),
])
def test_bad_content_length_gets_an_http_error_not_a_traceback(served, headers, status):
    url, _, _ = served
    port = int(url.rsplit(":", 1)[1].split("/")[0])
    reply = _raw(port, b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n" + headers + b"\r\n{}")
    assert reply.split(b"\r\n", 1)[0].split(b" ")[1] == status, reply[:200]
    assert b'"error"' in reply


def test_half_open_connections_take_no_threads_and_time_out(model_and_processor):
    model, processor = model_and_processor
    # the idle timeout leaves a loaded CI box seconds to accept all 300 before the first ones are closed
    server, url = _start(ChatService(model, processor, NAME, default_max_tokens=2), workers=2, idle_timeout_s=6,
                         max_connections=400)
    port = server.server_address[1]
    try:
        before = threading.active_count()
        idle = [socket.create_connection(("127.0.0.1", port), timeout=30) for _ in range(300)]
        deadline = time.monotonic() + 5
        while server.open < 300 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert server.open == 300
        assert threading.active_count() <= before + 2  # at most the two pool workers started
        reply = _client(url).chat.completions.create(model=NAME, messages=HI, max_tokens=2)
        assert reply.choices[0].message.role == "assistant"  # served while 300 connections hang
        assert all(s.recv(1) == b"" for s in idle)  # closed by the server after idle_timeout_s, well before 30 s
        for s in idle:
            s.close()
        assert server.open <= 1  # the openai client may keep its own connection alive
    finally:
        _stop(server)


def test_connections_beyond_the_limit_are_closed_at_once(model_and_processor):
    model, processor = model_and_processor
    server, _ = _start(ChatService(model, processor, NAME), workers=1, max_connections=3, idle_timeout_s=30)
    port = server.server_address[1]
    try:
        kept = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(3)]
        time.sleep(0.3)
        extra = socket.create_connection(("127.0.0.1", port), timeout=10)
        assert extra.recv(1) == b""
        extra.close()
        for s in kept:
            s.close()
    finally:
        _stop(server)


def test_stream_chunks_are_openai_chunk_objects(served):
    url, _, _ = served
    chunks = list(_client(url).chat.completions.create(model=NAME, messages=HI, max_tokens=4, temperature=0,
                                                       stream=True))
    assert all(c.object == "chat.completion.chunk" and c.model == NAME for c in chunks)
    assert len({c.id for c in chunks}) == 1
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
