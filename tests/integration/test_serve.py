"""``mmalign serve`` end to end: a tiny LLaVA saved to disk, loaded with ``load_vlm``, served on 127.0.0.1 and
called with the project's own API client (and the LLM corrupter), plus the CLI in a subprocess. The OpenAI
features (streaming, n, stop, logprobs, response_format, API key) and the HTTP limits: test_serve_openai.py."""

import base64
import io
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import pytest
from PIL import Image

from mmalign.data.schema import PreferenceRecord
from mmalign.models.loading import load_vlm
from mmalign.models.tiny import build_tiny_vlm
from mmalign.sampling.corrupt import LLMCorruptionConfig, ResponseCache, corrupt_records
from mmalign.sampling.generate import GenerationParams, generate
from mmalign.sampling.openai_client import ChatClient, ChatError, EndpointConfig
from mmalign.sampling.chat_service import ChatService
from mmalign.sampling.server import make_server

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_llava")
    model, processor = build_tiny_vlm("llava", seed=0)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def served(model_dir):
    model, processor = load_vlm(model_dir)
    service = ChatService(model, processor, "tiny-llava", default_max_tokens=12)
    server = make_server(service, "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1", model, processor
    server.shutdown()
    server.server_close()


def _image(colour):
    return Image.new("RGB", (32, 32), colour)


def _data_url(image):
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _client(url, **kw):
    return ChatClient(EndpointConfig(base_url=url, model="tiny-llava", requests_per_s=1000.0, max_retries=0, **kw))


def _post(url, body):
    request = urllib.request.Request(url + "/chat/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())


def test_models_and_greedy_image_chat_match_generate(served):
    url, model, processor = served
    with urllib.request.urlopen(url + "/models", timeout=10) as response:
        listing = json.loads(response.read())
    assert [m["id"] for m in listing["data"]] == ["tiny-llava"]
    image = _image((200, 30, 30))
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": _data_url(image)}},
                                             {"type": "text", "text": "Describe the image."}]}]
    reply = _post(url, {"model": "tiny-llava", "messages": messages, "temperature": 0, "max_tokens": 10})
    prompt = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe the image."}]}]
    (expected,) = generate(model, processor, [prompt], [[image]], GenerationParams(max_new_tokens=10, temperature=0.0))
    choice = reply["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": expected} and expected
    assert choice["finish_reason"] in ("stop", "length")
    assert reply["usage"]["prompt_tokens"] > 16  # 16 image tokens of the 32x32 tile plus the text
    # The image matters: another image gives the answer generate gives for that image.
    (other,) = generate(model, processor, [prompt], [[_image((20, 20, 220))]],
                        GenerationParams(max_new_tokens=10, temperature=0.0))
    messages[0]["content"][0]["image_url"]["url"] = _data_url(_image((20, 20, 220)))
    assert _client(url).complete(messages, temperature=0.0, max_tokens=10, seed=0) == other


def test_sampling_is_seeded(served):
    url, _, _ = served
    client = _client(url)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Describe the image."}]
    first = [client.complete(messages, temperature=1.0, max_tokens=12, seed=s) for s in range(4)]
    again = [client.complete(messages, temperature=1.0, max_tokens=12, seed=s) for s in range(4)]
    assert first == again and len(set(first)) >= 3  # a random-init model samples different text per seed


@pytest.mark.parametrize("body, status, text", [
    ({"model": "other", "messages": [{"role": "user", "content": "hi"}]}, 404, "not served here"),
    ({"model": "tiny-llava", "messages": [{"role": "user", "content": "hi"}], "tools": []}, 400, "'tools'"),
    ({"model": "tiny-llava", "messages": [{"role": "user", "content": "hi"}], "stop": ["a", "b", "c", "d", "e"]},
     400, "up to 4"),
    ({"model": "tiny-llava", "messages": [{"role": "user", "content": "hi"}], "n": 9}, 400, "n <= 8"),
    ({"model": "tiny-llava", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5000}, 400,
     "max_tokens <= 4096"),
    ({"model": "tiny-llava", "messages": [{"role": "user", "content": "hi"}], "stream": True, "logprobs": True},
     400, "cannot be combined"),
    ({"model": "tiny-llava", "messages": [{"role": "user", "content": "hi"}],
      "response_format": {"type": "json_schema"}}, 400, "not supported"),
    ({"model": "tiny-llava", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://example.com/x.png"}}]}]}, 400, "only inline images"),
    ({"model": "tiny-llava", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}]}, 400, "unreadable"),
    ({"model": "tiny-llava", "messages": [{"role": "assistant", "content": "hi"}]}, 400, "user's turn"),
    ({"model": "tiny-llava", "messages": [{"role": "user", "content": "hi"}], "temperature": -1}, 400, "temperature"),
])
def test_bad_requests_get_openai_style_errors(served, body, status, text):
    url, _, _ = served
    with pytest.raises(urllib.error.HTTPError) as err:
        _post(url, body)
    assert err.value.code == status
    assert text in json.loads(err.value.read())["error"]["message"]


def test_client_reports_a_refused_request_without_retrying(served):
    url, _, _ = served
    client = _client(url)
    client.endpoint.model = "nope"
    with pytest.raises(ChatError, match="HTTP 404 .*not served here"):
        client.complete([{"role": "user", "content": "hi"}], temperature=0.0, max_tokens=4, seed=0)
    assert client.requests_sent == 1


def test_llm_corrupter_against_the_served_model_uses_its_cache(served, tmp_path):
    url, _, _ = served
    records = [PreferenceRecord(f"r{i}", [], f"Question {i}?", f"There is a red circle number {i}.", [])
               for i in range(3)]
    cfg = LLMCorruptionConfig(endpoint=EndpointConfig(base_url=url, model="tiny-llava", requests_per_s=1000.0,
                                                      max_workers=2), temperature=1.0, max_tokens=8)
    first_client = ChatClient(cfg.endpoint)
    out, summary = corrupt_records(records, cfg, seed=1, client=first_client, cache=ResponseCache(tmp_path))
    assert first_client.requests_sent == 3 and summary["calls"] == 3
    second_client = ChatClient(cfg.endpoint)
    again, summary = corrupt_records(records, cfg, seed=1, client=second_client, cache=ResponseCache(tmp_path))
    assert second_client.requests_sent == 0 and summary["cache_hits"] == 3
    assert [r.rejected for r in again] == [r.rejected for r in out]


def test_serve_cli_in_a_subprocess(model_dir):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    # both spellings of the same fields: --key value and key=value
    proc = subprocess.Popen([sys.executable, "-m", "mmalign.cli.main", "serve", "--model", str(model_dir),
                             "--port", str(port), "name=cli-llava", "--default_max_tokens=5"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}/v1"
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(url + "/models", timeout=5) as response:
                    assert json.loads(response.read())["data"][0]["id"] == "cli-llava"
                break
            except urllib.error.URLError:
                assert proc.poll() is None, proc.stdout.read().decode()
                assert time.monotonic() < deadline, "server did not come up in 120 s"
                time.sleep(0.5)
        reply = _post(url, {"model": "cli-llava", "messages": [{"role": "user", "content": "hi"}], "temperature": 0})
        model, processor = load_vlm(model_dir)
        (expected,) = generate(model, processor, [[{"role": "user", "content": [{"type": "text", "text": "hi"}]}]],
                               [[]], GenerationParams(max_new_tokens=5, temperature=0.0))
        assert reply["choices"][0]["message"]["content"] == expected  # default_max_tokens=5 reached the server
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_serve_cli_refuses_a_missing_model_clearly(model_dir, capsys):
    from mmalign.cli.main import main

    assert main(["serve", "--model", str(model_dir / "nowhere"), "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mmalign serve: model ") and "nowhere': no such directory" in err
    (model_dir / "empty").mkdir(exist_ok=True)
    assert main(["serve", "--model", str(model_dir / "empty"), "--port", "0"]) == 2
    assert "no config.json" in capsys.readouterr().err


def test_serve_cli_refuses_a_hub_id_and_a_missing_key_variable(model_dir, capsys, monkeypatch):
    from mmalign.cli.main import main

    assert main(["serve", "--model", "llava-hf/llava-1.5-7b-hf"]) == 2
    assert "no hub access" in capsys.readouterr().err
    monkeypatch.delenv("MMALIGN_TEST_KEY", raising=False)
    assert main(["serve", "--model", str(model_dir), "--api_key_env", "MMALIGN_TEST_KEY"]) == 2
    assert "MMALIGN_TEST_KEY is not set" in capsys.readouterr().err


def test_sample_corrupt_reports_a_missing_input(tmp_path):
    from mmalign.cli.main import main

    assert main(["sample", "corrupt", "method=lab", f"input={tmp_path / 'missing.jsonl'}",
                 f"output={tmp_path / 'o.jsonl'}", f"lab_dir={tmp_path}"]) == 2  # a clear error, not a traceback


@pytest.mark.parametrize("family", ["llava_next", "idefics3", "gemma3"])
def test_service_matches_generate_on_other_families(family):
    model, processor = build_tiny_vlm(family, seed=0)
    service = ChatService(model, processor, family)
    image = _image((30, 160, 60))
    request = {"model": family, "temperature": 0, "max_tokens": 6, "messages": [
        {"role": "user", "content": [{"type": "text", "text": "What is shown?"},
                                     {"type": "image_url", "image_url": {"url": _data_url(image)}}]}]}
    prompt = [{"role": "user", "content": [{"type": "text", "text": "What is shown?"}, {"type": "image"}]}]
    (expected,) = generate(model, processor, [prompt], [[image]], GenerationParams(max_new_tokens=6, temperature=0.0))
    assert service.complete(request)["choices"][0]["message"]["content"] == expected
