"""LLM judges through any OpenAI-compatible chat endpoint (an API, vLLM, or ``mmalign serve``).

A judge call is one chat request built by a benchmark (``mmhal``, ``llava_bench``); the image, when the
judge must see it (MMHal-V), is sent inline as a ``data:`` URL, the form ``mmalign serve`` accepts. Requests run
in a thread pool of ``endpoint.max_workers`` with the client's rate limit and retries
(``sampling.openai_client``); replies are cached on disk by request hash, so a killed evaluation re-run asks the
judge only what it has not answered yet.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from mmalign.sampling.corrupt import ResponseCache
from mmalign.sampling.openai_client import ChatClient, EndpointConfig

logger = logging.getLogger(__name__)


@dataclass
class JudgeConfig:
    """The judge model and its decoding: ``temperature`` (MMHal: 0, LLaVA-Bench: 0.2 in the reference scripts),
    ``max_tokens`` per reply, ``seed``; ``cache_dir``: reply cache ("" = ``<out_dir>/judge_cache``)."""

    endpoint: EndpointConfig = field(default_factory=EndpointConfig)  # OpenAI-compatible endpoint of the judge
    temperature: float = 0.0  # judge sampling temperature
    max_tokens: int = 1024  # most tokens of one judge reply
    seed: int = 0  # seed sent with each request
    cache_dir: str = ""  # reply cache ("" = <out_dir>/judge_cache)


def image_part(data: bytes) -> dict[str, Any]:
    """An OpenAI ``image_url`` content part carrying encoded image bytes inline."""
    return {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(data).decode()}}


def _key(model: str, messages: list[dict[str, Any]], cfg: JudgeConfig) -> str:
    blob = json.dumps({"model": model, "messages": messages, "temperature": cfg.temperature,
                       "max_tokens": cfg.max_tokens, "seed": cfg.seed}, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def ask_judge(requests: Sequence[list[dict[str, Any]]], cfg: JudgeConfig, cache_dir: str,
              client: ChatClient | None = None) -> list[str]:
    """The judge's reply to every request (a list of chat messages), in order; cached replies are reused."""
    client = client if client is not None else ChatClient(cfg.endpoint)
    cache = ResponseCache(cfg.cache_dir or cache_dir)
    keys = [_key(client.endpoint.model, messages, cfg) for messages in requests]
    missing = {k: m for k, m in zip(keys, requests) if cache.get(k) is None}

    def call(key: str) -> None:
        reply = client.complete(missing[key], temperature=cfg.temperature, max_tokens=cfg.max_tokens, seed=cfg.seed)
        cache.put(key, reply, client.endpoint.model)

    if missing:
        logger.info("judge %s: %d request(s), %d cached", client.endpoint.model, len(missing), len(keys) - len(missing))
        with ThreadPoolExecutor(max_workers=client.endpoint.max_workers) as pool:
            list(pool.map(call, missing))
    return [cache.get(k) for k in keys]
