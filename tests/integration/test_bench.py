"""``mmalign eval bench`` on a tiny VLM over the official-layout sample files of every benchmark; judges are a
stub OpenAI-compatible server (fixed verdicts, requests recorded) and ``mmalign serve`` itself."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from mmalign.evaluation.bench import (
    BenchConfig, ChairBenchConfig, LlavaBenchConfig, MMHalBenchConfig, PopeBenchConfig, run_benchmark,
)
from mmalign.evaluation.judges import JudgeConfig
from mmalign.models.tiny import build_tiny_vlm
from mmalign.sampling.openai_client import EndpointConfig
from mmalign.sampling.server import ChatService, make_server

pytestmark = pytest.mark.integration
BENCH = Path(__file__).parents[1] / "assets" / "benchmarks"
COCO = BENCH / "coco"


@pytest.fixture(scope="module")
def tiny():
    return build_tiny_vlm("llava", seed=0)


@pytest.fixture()
def stub_judge():
    """A chat endpoint answering MMHal prompts with "Rating: 5" and LLaVA-Bench prompts with "8 4"."""
    requests: list[dict] = []

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            requests.append(body)
            reply = "8 4\nThe second is shorter." if body["messages"][0]["role"] == "system" else "Fine. Rating: 5"
            data = json.dumps({"choices": [{"message": {"role": "assistant", "content": reply}}]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1", requests
    server.shutdown()


MMHAL = MMHalBenchConfig(questions=str(BENCH / "mmhal" / "response_template.json"),
                         images=str(BENCH / "mmhal" / "images"), max_new_tokens=6)


def _judge(url, model, **fields):
    return JudgeConfig(endpoint=EndpointConfig(base_url=url, model=model, requests_per_s=100.0), **fields)


def _cfg(tmp_path, benchmark, **fields):
    return BenchConfig(benchmark=benchmark, out_dir=str(tmp_path / benchmark), batch_size=4, **fields)


@pytest.mark.parametrize("scorer", ["generate", "likelihood"])
def test_pope_official_files(tiny, tmp_path, scorer):
    cfg = _cfg(tmp_path, "pope", pope=PopeBenchConfig(files=[str(p) for p in sorted((BENCH / "pope").glob("*.json"))],
                                                      images=str(COCO / "val2014"), scorer=scorer, max_new_tokens=4))
    result = run_benchmark(cfg, *tiny)
    assert {k.rsplit("/", 1)[0] for k in result["metrics"]} == {"pope/adversarial", "pope/random", "pope/all"}
    assert result["metrics"]["pope/all/accuracy"]["n"] == 6
    samples = [json.loads(line) for line in (tmp_path / "pope" / "samples.jsonl").read_text().splitlines()]
    assert samples[0]["prompt"].endswith("\nAnswer the question using a single word or phrase.")


@pytest.mark.parametrize("questions", ["object_halbench", ""])
def test_chair_on_object_halbench_and_sampled_coco_images(tiny, tmp_path, questions):
    chair = ChairBenchConfig(
        questions=str(BENCH / "object_halbench" / "obj_halbench_300_with_image.jsonl") if questions else "",
        images=str(COCO / "val2014"), instances=str(COCO / "annotations" / "instances_val2014.json"),
        captions=str(COCO / "annotations" / "captions_val2014.json"), synonyms=str(COCO / "synonyms.txt"),
        max_new_tokens=6)
    cfg = _cfg(tmp_path, "chair", chair=chair)
    result = run_benchmark(cfg, *tiny)
    assert result["metrics"]["chair/recall"]["n"] == (2 if questions else 3)
    assert set(result["metrics"]) >= {"chair/chair_i", "chair/chair_s", "chair/chair_s_refine", "chair/recall"}


@pytest.mark.parametrize("benchmark", ["mmhal", "mmhal_v"])
def test_mmhal_judged_through_an_endpoint(tiny, tmp_path, stub_judge, benchmark):
    url, requests = stub_judge
    cfg = _cfg(tmp_path, benchmark, mmhal=MMHAL, judge=_judge(url, "judge"))
    result = run_benchmark(cfg, *tiny)
    assert result["metrics"][f"{benchmark}/score"]["value"] == 5.0
    assert result["metrics"][f"{benchmark}/hallucination_rate"]["value"] == 0.0
    assert f"{benchmark}/type/counting/score" in result["metrics"]
    content = requests[0]["messages"][0]["content"]
    assert isinstance(content, list) == (benchmark == "mmhal_v")  # MMHal-V sends the image with the prompt
    if benchmark == "mmhal_v":
        assert content[0]["image_url"]["url"].startswith("data:image/png;base64,")
    n = len(requests)
    run_benchmark(cfg, *tiny)  # a re-run reads every verdict from the judge cache
    assert len(requests) == n == 2


def test_llava_bench_relative_score(tiny, tmp_path, stub_judge):
    url, requests = stub_judge
    bench = LlavaBenchConfig(folder=str(BENCH / "llava_bench"), max_new_tokens=6)
    cfg = _cfg(tmp_path, "llava_bench", llava_bench=bench, judge=_judge(url, "judge"))
    result = run_benchmark(cfg, *tiny)
    assert result["metrics"]["llava_bench/all/relative_score"]["value"] == pytest.approx(50.0)
    assert {"llava_bench/conv/relative_score", "llava_bench/detail/relative_score"} <= set(result["metrics"])
    assert requests[0]["messages"][0]["role"] == "system" and len(requests) == 3


def test_mmhal_v_judged_by_mmalign_serve(tiny, tmp_path):
    """The judge can be a local model behind ``mmalign serve``: image parts go through; its (random) replies
    hold no rating, so every answer scores 0 and counts as unparsed."""
    server = make_server(ChatService(*build_tiny_vlm("llava", seed=1), "tiny-judge", default_max_tokens=8),
                         "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        cfg = _cfg(tmp_path, "mmhal_v", mmhal=MMHAL,
                   judge=_judge(f"http://127.0.0.1:{server.server_address[1]}/v1", "tiny-judge", max_tokens=8))
        result = run_benchmark(cfg, *tiny)
    finally:
        server.shutdown()
    assert result["metrics"]["mmhal_v/unparsed_rate"]["value"] == 1.0
    assert result["metrics"]["mmhal_v/score"]["value"] == 0.0


def test_cli_bench_reports_a_missing_file_setting(tmp_path, capsys):
    from mmalign.cli.main import main

    assert main(["eval", "bench", "benchmark=mmhal", f"out_dir={tmp_path}"]) == 2
    assert "needs mmhal.questions, mmhal.images" in capsys.readouterr().err
