"""Corruption of chosen answers into rejected ones: by an LLM (Apple Appendix C.1) or the lab's exact rule.

LLM corruption (Apple, "Understanding Alignment in Multimodal LLMs", Sec. 5.3 and Appendix C.1; after
POVID, Zhou et al. 2024): a text LLM, shown a few-shot prompt kept as a data file
(``prompts/corrupt_fewshot.json``), rewrites the chosen answer with realistic hallucinations, i.e. ones a
reader cannot spot without the image. The paper found obvious corruptions ("hackable" by the policy)
hurt, hence a prompt that forbids tags and disclaimers. Requests go to any OpenAI-compatible endpoint
(``openai_client``); every reply is cached on disk under a hash of (endpoint model, full message list =
few-shot prompt + question + answer, temperature, max_tokens, seed), so a rerun, or a run resumed after a
crash, sends only the requests it has not sent before.

The output record keeps ``chosen`` and puts the corruption first in ``rejected`` (existing rejected answers
follow), with provenance in ``meta["corruption"]``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from mmalign.config import config_hash, to_dict
from mmalign.data.chat import IMAGE_MARKER
from mmalign.data.record_files import write_records
from mmalign.data.record_set import RecordSet
from mmalign.data.schema import PreferenceRecord
from mmalign.lab.corrupt import corrupt_lab_records
from mmalign.progress import track
from mmalign.sampling.openai_client import ChatClient, EndpointConfig

logger = logging.getLogger(__name__)

DEFAULT_PROMPT = Path(__file__).parent / "prompts" / "corrupt_fewshot.json"


@dataclass
class LLMCorruptionConfig:
    """The corrupting LLM: endpoint, few-shot prompt file ("" = the packaged one) and sampling settings."""

    endpoint: EndpointConfig = field(default_factory=EndpointConfig)
    prompt_file: str = ""  # few-shot corruption prompt ("": the packaged one)
    temperature: float = 0.7  # sampling temperature of the corrupting LLM
    max_tokens: int = 512  # most tokens of one corrupted answer
    cache_dir: str = ""  # response cache, so a rerun pays for no call twice ("": <output folder>/corrupt_cache)

    def __post_init__(self) -> None:
        if self.temperature < 0 or self.max_tokens < 1:
            raise ValueError("need temperature >= 0 and max_tokens >= 1")


@dataclass
class FewShotPrompt:
    """A corruption prompt: system text, a user template with ``{question}`` and ``{answer}``, examples."""

    system: str
    user_template: str
    examples: list[dict[str, str]]
    sha256: str

    def messages(self, question: str, answer: str) -> list[dict[str, str]]:
        """OpenAI chat messages: system, one user/assistant turn per example, then the answer to corrupt."""
        out = [{"role": "system", "content": self.system}]
        for ex in self.examples:
            out.append({"role": "user", "content": self.user_template.format(question=ex["question"],
                                                                          answer=ex["answer"])})
            out.append({"role": "assistant", "content": ex["corrupted"]})
        out.append({"role": "user", "content": self.user_template.format(question=question, answer=answer)})
        return out


def load_fewshot(path: str | Path = "") -> FewShotPrompt:
    """Read and check a few-shot prompt JSON file (keys ``system``, ``user_template``, ``examples``)."""
    path = Path(path) if path else DEFAULT_PROMPT
    raw_text = path.read_text(encoding="utf-8")
    try:
        raw = json.loads(raw_text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON: {err}") from err
    for key, kind in (("system", str), ("user_template", str), ("examples", list)):
        if not isinstance(raw.get(key), kind):
            raise ValueError(f"{path}: field {key!r} must be a {kind.__name__}")
    template = raw["user_template"]
    if "{question}" not in template or "{answer}" not in template:
        raise ValueError(f"{path}: user_template must contain {{question}} and {{answer}}")
    for i, ex in enumerate(raw["examples"]):
        if not isinstance(ex, dict) or not all(isinstance(ex.get(k), str) for k in ("question", "answer", "corrupted")):
            raise ValueError(f"{path}: examples[{i}] needs string fields 'question', 'answer', 'corrupted'")
    return FewShotPrompt(raw["system"], template, raw["examples"], hashlib.sha256(raw_text.encode()).hexdigest())


def question_text(prompt: str | list[dict[str, Any]]) -> str:
    """The text of a record prompt the answer responds to: image markers removed; for chat messages the
    text parts of the last user turn."""
    if isinstance(prompt, str):
        return prompt.replace(IMAGE_MARKER, " ").strip()
    content = prompt[-1]["content"]
    if isinstance(content, str):
        return content.strip()
    return "\n".join(part["text"].strip() for part in content if part["type"] == "text")


class ResponseCache:
    """One JSON file per request hash under ``root`` (``<root>/<key[:2]>/<key>.json``), written atomically."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def _path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.json"

    def get(self, key: str) -> str | None:
        path = self._path(key)
        if not path.is_file():
            return None
        try:
            return json.loads(path.read_text(encoding="utf-8"))["text"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise ValueError(f"corrupt cache entry {path} ({err!r}); delete it to re-request") from err

    def put(self, key: str, text: str, model: str) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"key": key, "model": model, "text": text}, ensure_ascii=False), encoding="utf-8")
        tmp.replace(path)


def request_key(model: str, messages: list[dict[str, str]], temperature: float, max_tokens: int, seed: int) -> str:
    """Hex SHA-256 identifying one corruption request (the cache key)."""
    blob = json.dumps({"model": model, "messages": messages, "temperature": temperature,
                       "max_tokens": max_tokens, "seed": seed}, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def _fetch_missing(requests: dict[str, list[dict[str, str]]], cfg: LLMCorruptionConfig, seed: int,
                   client: ChatClient, cache: ResponseCache) -> None:
    """Send every request not yet cached (in parallel, rate-limited); each reply is cached as it arrives."""
    def call(key: str) -> None:
        text = client.complete(requests[key], temperature=cfg.temperature, max_tokens=cfg.max_tokens, seed=seed)
        cache.put(key, text, cfg.endpoint.model)

    with ThreadPoolExecutor(max_workers=cfg.endpoint.max_workers) as pool:
        futures = [pool.submit(call, key) for key in requests]
        try:
            for future in track(futures, "corrupt (LLM requests)", unit="req"):
                future.result()
        except Exception:
            pool.shutdown(cancel_futures=True)  # the replies received are cached; send no more
            raise


def corrupt_records(records: list[PreferenceRecord], cfg: LLMCorruptionConfig, *, seed: int, client: ChatClient,
                    cache: ResponseCache) -> tuple[list[PreferenceRecord], dict[str, Any]]:
    """LLM-corrupted preference records and a summary (``calls``, ``cache_hits``, ``skipped_ids``).

    A record whose reply is empty, equal to ``chosen`` or to one of its rejected answers is skipped and
    counted (it would make no preference pair). Raises ChatError when the endpoint fails for good; the
    replies received until then stay cached.
    """
    prompt = load_fewshot(cfg.prompt_file)
    keys, requests = [], {}
    for record in records:
        messages = prompt.messages(question_text(record.prompt), record.chosen)
        key = request_key(cfg.endpoint.model, messages, cfg.temperature, cfg.max_tokens, seed)
        keys.append(key)
        if cache.get(key) is None:
            requests[key] = messages
    logger.info("corrupt: %d records, %d cached, %d requests to send", len(records), len(records) - len(requests),
                len(requests))
    _fetch_missing(requests, cfg, seed, client, cache)
    settings = {"method": "llm", "model": cfg.endpoint.model, "prompt_sha256": prompt.sha256,
                "temperature": cfg.temperature, "max_tokens": cfg.max_tokens, "seed": seed}
    out, skipped = [], []
    for record, key in zip(records, keys):
        text = cache.get(key).strip()
        if not text or text == record.chosen.strip() or text in (r.strip() for r in record.rejected):
            skipped.append(record.id)
            continue
        meta = dict(record.meta) | {"corruption": settings | {"cache_key": key}}
        out.append(dataclasses.replace(record, rejected=[text, *record.rejected], meta=meta))
    if skipped:
        logger.warning("corrupt: %d record(s) skipped, the reply made no new rejected answer: %s", len(skipped),
                       skipped[:10])
    return out, {"records": len(records), "written": len(out), "calls": len(requests),
                 "cache_hits": len(records) - len(requests), "skipped_ids": skipped}


@dataclass
class CorruptConfig:
    """``mmalign sample corrupt``: read records, corrupt each chosen answer, write preference records.

    ``method="llm"`` uses ``llm`` (cache in ``llm.cache_dir``, default ``<output folder>/corrupt_cache``);
    ``method="lab"`` uses the exact lab corrupter with the bias pairs of ``<lab_dir>/bias.json``.
    """

    input: str = ""  # records whose chosen answers are corrupted (.jsonl / .parquet)
    output: str = ""  # preference record file to write
    data_root: str = ""  # folder image paths are relative to ("": the input's folder)
    # llm (an OpenAI-compatible endpoint) or lab (the exact ShapesWorld corrupter)
    method: Literal["llm", "lab"] = "llm"
    seed: int = 0  # seed of the per-record sampling
    llm: LLMCorruptionConfig = field(default_factory=LLMCorruptionConfig)
    lab_dir: str = ""  # method=lab: the lab folder holding bias.json


def _bias_pairs(lab_dir: str) -> list[list[str]]:
    path = Path(lab_dir) / "bias.json"
    if not lab_dir or not path.is_file():
        raise ValueError(f"method=lab needs lab_dir holding bias.json; {str(path)!r} not found")
    pairs = json.loads(path.read_text(encoding="utf-8")).get("pairs")
    if not isinstance(pairs, list):
        raise ValueError(f"{path}: field 'pairs' must be a list of [trigger, partner]")
    return pairs


def run_corruption(cfg: CorruptConfig) -> dict[str, Any]:
    """Corrupt ``cfg.input`` into ``cfg.output`` (+ provenance sidecar); returns the summary."""
    if not cfg.input or not cfg.output:
        raise ValueError("input and output record files are required")
    records = RecordSet.at(cfg.input, cfg.data_root).read()
    if cfg.method == "lab":
        out = corrupt_lab_records(records, _bias_pairs(cfg.lab_dir), cfg.seed)
        summary: dict[str, Any] = {"records": len(records), "written": len(out)}
    else:
        cache_dir = cfg.llm.cache_dir or str(Path(cfg.output).parent / "corrupt_cache")
        out, summary = corrupt_records(records, cfg.llm, seed=cfg.seed, client=ChatClient(cfg.llm.endpoint),
                                       cache=ResponseCache(cache_dir))
    write_records(cfg.output, out, provenance={"sampler": f"corrupt_{cfg.method}", "config": to_dict(cfg),
                                               "config_hash": config_hash(cfg), "summary": summary})
    logger.info("corrupt: wrote %d of %d records to %s", len(out), len(records), cfg.output)
    return summary
