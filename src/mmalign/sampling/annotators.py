"""Annotators: turn a prompt's rollouts into a chosen / rejected pair (Online-DPO, Apple arXiv 2407.02477 Sec. 2.3).

One interface, ``annotate(groups) -> list[Annotation]``: a group is one prompt (record + images) with its k
answers; an annotation names the indices of the chosen and the rejected answer (or none when the annotator
sees no difference) and carries a JSON-able ``verdict`` so every online pair can be audited.

- Scoring annotators rate each answer and pair the best with the worst: the lab oracle (exact, from scene
  ground truth: minus the number of hallucinated plus missed objects) and a trained reward model
  (``mmalign.sampling.reward_scoring``).
- Pairwise judges (Apple Appendix D, Table 14 prompt structure in ``prompts/judge_pairwise.txt``) are shown
  the image, the question and two responses and asked which has less hallucination and is more helpful.
  Every pair of distinct answers is asked in both orders (cancels position bias); an answer scores 1 per
  order it wins, and the answers are ranked by their total wins (Copeland). The judge is a local VLM or any
  OpenAI-compatible endpoint (``mmalign serve``, a hosted model).
- ``NoisyAnnotator`` flips a wrapped annotator's pair with a set probability (a weak annotator in the lab).
"""

from __future__ import annotations

import base64
import hashlib
import io
import itertools
import random
import re
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

from PIL import Image

from mmalign.config import ConfigError
from mmalign.data.chat import IMAGE_MARKER
from mmalign.data.schema import PreferenceRecord
from mmalign.models.loading import load_vlm
from mmalign.sampling.corrupt import question_text
from mmalign.sampling.generate import GenerationParams, generate
from mmalign.sampling.openai_client import ChatClient, EndpointConfig
from mmalign.sampling.reward_scoring import RewardScorer, ScorerConfig, load_scorer

DEFAULT_TEMPLATE = Path(__file__).parent / "prompts" / "judge_pairwise.txt"


@dataclass
class RolloutGroup:
    """One prompt and its answers. ``salt`` makes random annotators draw afresh per use (e.g. the step)."""

    record: PreferenceRecord
    images: list[Image.Image]
    answers: list[str]
    salt: str = ""


@dataclass
class Annotation:
    """``chosen`` / ``rejected``: indices into the group's answers (both None: no preference)."""

    chosen: int | None
    rejected: int | None
    verdict: dict[str, Any] = field(default_factory=dict)

    @property
    def has_pair(self) -> bool:
        return self.chosen is not None

    def pair_texts(self, answers: Sequence[str]) -> tuple[str, str] | None:
        """(chosen, rejected) answer texts; None without a preference or when either is empty (a sample may stop
        at once, and a preference record refuses empty text), the one rule every pair writer follows."""
        if not self.has_pair or not answers[self.chosen].strip() or not answers[self.rejected].strip():
            return None
        return answers[self.chosen], answers[self.rejected]


class Annotator(Protocol):
    name: str

    def annotate(self, groups: Sequence[RolloutGroup]) -> list[Annotation]: ...


def pair_from_scores(answers: Sequence[str], scores: Sequence[float]) -> tuple[int, int] | None:
    """(index of the best, index of the worst) answer; None when all scores tie or the two texts are equal.

    Ties pick the earliest index, so the result is a pure function of (answers, scores).
    """
    best = max(range(len(scores)), key=lambda i: (scores[i], -i))
    worst = min(range(len(scores)), key=lambda i: (scores[i], i))
    if scores[best] == scores[worst] or answers[best] == answers[worst]:
        return None
    return best, worst


def _scored(groups: Sequence[RolloutGroup], scores: list[list[float]], extra: list[dict]) -> list[Annotation]:
    out = []
    for group, s, e in zip(groups, scores, extra):
        pair = pair_from_scores(group.answers, s)
        verdict = {"scores": s, **e}
        out.append(Annotation(*pair, verdict) if pair else Annotation(None, None, verdict))
    return out


# --- lab oracle --------------------------------------------------------------------------------------------


def read_synonyms(path: str | Path) -> list[list[str]]:
    """CHAIR vocabulary rows (one object class per line, comma-separated, canonical name first)."""
    rows = [[w.strip() for w in line.split(",") if w.strip()] for line in Path(path).read_text().splitlines()]
    rows = [r for r in rows if r]
    if not rows:
        raise ValueError(f"{path}: no object classes in the synonyms file")
    return rows


class LabOracle:
    """Exact annotator from scene ground truth (``record.meta["objects"]``, canonical names).

    A caption scores ``-(hallucinated + missed)``: distinct vocabulary objects it names that are absent, plus
    present objects it does not name. A yes/no record (``meta["task"] == "yesno"``) scores 0 when the first
    word of the answer is the right "Yes"/"No" for the object its question names, else -1.
    """

    name = "oracle"

    def __init__(self, synonyms: Sequence[Sequence[str]]):
        self.canonical = {w.lower(): row[0] for row in synonyms for w in row}
        words = sorted(self.canonical, key=len, reverse=True)  # longest first: "red circles" before "red circle"
        self.pattern = re.compile(r"\b(" + "|".join(re.escape(w) for w in words) + r")\b")

    def mentions(self, text: str) -> set[str]:
        """Canonical names of the objects ``text`` names."""
        return {self.canonical[m] for m in self.pattern.findall(text.lower())}

    def counts(self, answer: str, objects: Sequence[str]) -> tuple[int, int]:
        """(hallucinated, missed) object counts of a caption."""
        named, present = self.mentions(answer), set(objects)
        return len(named - present), len(present - named)

    def score(self, record: PreferenceRecord, answer: str) -> float:
        objects = record.meta.get("objects")
        if not isinstance(objects, list) or not all(isinstance(o, str) for o in objects):
            raise ValueError(f"record {record.id!r}, field 'meta.objects': the oracle needs the scene's object "
                             f"names, got {objects!r}")
        if record.meta.get("task") != "yesno":
            hallucinated, missed = self.counts(answer, objects)
            return -float(hallucinated + missed)
        asked = self.mentions(question_text(record.prompt))
        if len(asked) != 1:
            raise ValueError(f"record {record.id!r}, field 'prompt': a yes/no question must name one object")
        words = answer.strip().split()
        said = words[0].strip(".,!").lower() if words else ""
        return 0.0 if said == ("yes" if asked <= set(objects) else "no") else -1.0

    def annotate(self, groups: Sequence[RolloutGroup]) -> list[Annotation]:
        scores = [[self.score(g.record, a) for a in g.answers] for g in groups]
        return _scored(groups, scores, [{} for _ in groups])


class NoisyAnnotator:
    """Flips the pair of ``base`` with probability ``error_rate`` (drawn from seed, record id, salt, answers)."""

    def __init__(self, base: Annotator, error_rate: float, seed: int):
        if not 0.0 <= error_rate <= 1.0:
            raise ValueError(f"error_rate must be in [0, 1], got {error_rate}")
        self.base, self.error_rate, self.seed = base, error_rate, seed
        self.name = f"noisy_{base.name}"

    def annotate(self, groups: Sequence[RolloutGroup]) -> list[Annotation]:
        out = []
        for group, ann in zip(groups, self.base.annotate(groups)):
            key = "\x1f".join([str(self.seed), group.record.id, group.salt, *group.answers])
            flip = ann.has_pair and random.Random(key).random() < self.error_rate
            verdict = {"base": ann.verdict, "flipped": flip}
            out.append(Annotation(ann.rejected, ann.chosen, verdict) if flip
                       else Annotation(ann.chosen, ann.rejected, verdict))
        return out


# --- pairwise judges ---------------------------------------------------------------------------------------


@dataclass
class JudgeTemplate:
    """The judge prompt: text with ``{question}``, ``{response_1}``, ``{response_2}``; ``sha256`` of the file."""

    text: str
    sha256: str

    def fill(self, question: str, response_1: str, response_2: str) -> str:
        return self.text.format(question=question, response_1=response_1, response_2=response_2)


def load_judge_template(path: str | Path = "") -> JudgeTemplate:
    """Read a judge prompt file ("" = the packaged Table 14-style prompt) and check its placeholders."""
    path = Path(path) if path else DEFAULT_TEMPLATE
    text = path.read_text(encoding="utf-8")
    for key in ("{question}", "{response_1}", "{response_2}"):
        if key not in text:
            raise ValueError(f"{path}: the judge prompt must contain {key}")
    return JudgeTemplate(text.strip(), hashlib.sha256(text.encode()).hexdigest())


_VERDICT = re.compile(r"(?:verdict|better response|preferred response|final answer|answer|choice)\s*(?:is)?\s*"
                      r"[:\-]?\s*[*\[(\"']*\s*(?:response|output|answer)?\s*#?\s*([12])\b")
_CLAIM = re.compile(r"response\s*([12])\s*(?:is|has|was|seems)\s+(?:the\s+)?(?:better|more|less|preferred|superior)")
_NO_PREFERENCE = re.compile(r"\b(tie|both (?:are|responses are) (?:equally|equal)|neither)\b")


def parse_verdict(text: str) -> int | None:
    """Which response a judge reply prefers: 1, 2, or None (unparseable, a tie, or contradictory).

    In order: the last explicit verdict ("Verdict: Response 2", "[[1]]", "Answer: 2"); a tie / neither
    statement gives None; a reply that is only "1"/"2"; claims like "Response 1 is better" naming one side
    only; a reply that names only one of "Response 1" / "Response 2".
    """
    low = text.lower()
    tagged = re.findall(r"\[\[\s*([12])\s*\]\]", low) or _VERDICT.findall(low)
    if tagged:
        return int(tagged[-1])
    if _NO_PREFERENCE.search(low):
        return None
    bare = low.strip().strip(".!*\"' ")
    if bare in ("1", "2"):
        return int(bare)
    for candidates in (set(_CLAIM.findall(low)), set(re.findall(r"response\s*([12])\b", low))):
        if len(candidates) == 1:
            return int(candidates.pop())
        if candidates:
            return None
    return None


@dataclass
class JudgeQuery:
    """One judge call: the record (question, images) and the two responses in the order shown."""

    record: PreferenceRecord
    images: list[Image.Image]
    response_1: str
    response_2: str


AskFn = Callable[[list[JudgeQuery]], list[str]]


class PairwiseJudge:
    """Ranks answers by pairwise judgements asked in both orders; ``ask`` sends the queries to a judge."""

    def __init__(self, ask: AskFn, name: str):
        self.ask, self.name = ask, name

    def annotate(self, groups: Sequence[RolloutGroup]) -> list[Annotation]:
        plans, queries = [], []
        for group in groups:
            distinct = list(dict.fromkeys(group.answers))
            first = [group.answers.index(a) for a in distinct]  # answer index of each distinct text
            pairs = list(itertools.combinations(range(len(distinct)), 2))
            for i, j in pairs:
                for a, b in ((i, j), (j, i)):
                    queries.append(JudgeQuery(group.record, group.images, distinct[a], distinct[b]))
            plans.append((first, pairs))
        replies = iter(self.ask(queries)) if queries else iter(())
        out = []
        for group, (first, pairs) in zip(groups, plans):
            wins = [0.0] * len(first)
            calls = []
            for i, j in pairs:
                for a, b in ((i, j), (j, i)):
                    reply = next(replies)
                    pick = parse_verdict(reply)
                    if pick is not None:
                        wins[a if pick == 1 else b] += 1.0
                    calls.append({"shown": [first[a], first[b]], "pick": pick, "reply": reply})
            scores = [wins[first.index(group.answers.index(a))] for a in group.answers]
            pair = pair_from_scores(group.answers, scores)
            verdict = {"scores": scores, "calls": calls}
            out.append(Annotation(*pair, verdict) if pair else Annotation(None, None, verdict))
        return out


def _judge_text(template: JudgeTemplate, q: JudgeQuery) -> str:
    return template.fill(question_text(q.record.prompt), q.response_1, q.response_2)


def vlm_ask(model: Any, processor: Any, template: JudgeTemplate, params: GenerationParams,
            batch_size: int) -> AskFn:
    """A local VLM judge: the record's images, then the filled template, answered by ``generate``."""

    def ask(queries: list[JudgeQuery]) -> list[str]:
        prompts = [IMAGE_MARKER * len(q.images) + "\n" + _judge_text(template, q) for q in queries]
        return generate(model, processor, prompts, [q.images for q in queries], params, seed=0,
                        batch_size=batch_size)

    return ask


def _data_url(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def api_ask(client: ChatClient, template: JudgeTemplate, max_tokens: int, seed: int) -> AskFn:
    """A judge over an OpenAI-compatible endpoint: images as inline data URLs, then the filled template."""

    def one(q: JudgeQuery) -> str:
        content = [{"type": "image_url", "image_url": {"url": _data_url(img)}} for img in q.images]
        content.append({"type": "text", "text": _judge_text(template, q)})
        return client.complete([{"role": "user", "content": content}], temperature=0.0, max_tokens=max_tokens,
                               seed=seed)

    def ask(queries: list[JudgeQuery]) -> list[str]:
        with ThreadPoolExecutor(max_workers=client.endpoint.max_workers) as pool:
            return list(pool.map(one, queries))

    return ask


# --- reward model and construction from a config ------------------------------------------------------------


class RewardModelAnnotator:
    """Scores each answer with a trained reward model (Bradley-Terry or critique-based, ``RewardScorer``) and
    pairs the best with the worst."""

    name = "reward_model"

    def __init__(self, scorer: RewardScorer):
        self.scorer = scorer

    def annotate(self, groups: Sequence[RolloutGroup]) -> list[Annotation]:
        scores = self.scorer.score_answers([g.record for g in groups], [g.images for g in groups],
                                           [g.answers for g in groups])
        return _scored(groups, scores, [{} for _ in groups])


@dataclass
class AnnotatorConfig:
    """Which annotator. ``error_rate`` > 0 wraps any kind in ``NoisyAnnotator`` (oracle + error = noisy oracle).

    oracle: ``synonyms`` (CHAIR vocabulary, e.g. ``<lab>/vocab/synonyms.txt``); vlm_judge: ``model`` (local
    VLM dir), ``template``, ``max_new_tokens``; api_judge: ``endpoint``, ``template``, ``max_new_tokens``;
    reward_model: ``model`` (a reward-model folder: ``mmalign train rm`` or ``mmalign.models.heads.save_reward_model``).
    """

    # oracle (lab CHAIR), vlm_judge (local VLM), api_judge (OpenAI-compatible endpoint), reward_model
    kind: Literal["oracle", "vlm_judge", "api_judge", "reward_model"] = "oracle"
    synonyms: str = ""  # oracle: CHAIR vocabulary file, e.g. <lab>/vocab/synonyms.txt
    model: str = ""  # vlm_judge: local VLM folder; reward_model: folder written by save_reward_model
    dtype: str | None = None  # dtype the judge / reward model is loaded in (None: float32)
    template: str = ""  # judge prompt file with {question}, {response_1}, {response_2} ("": the packaged one)
    max_new_tokens: int = 256  # most tokens of a judge's verdict
    batch_size: int = 16  # judge / reward-model inputs per forward pass (speed only)
    endpoint: EndpointConfig = field(default_factory=EndpointConfig)
    error_rate: float = 0.0  # flip each verdict with this probability (a noisy annotator; 0: off)
    seed: int = 0  # seed of the verdict flips

    def __post_init__(self) -> None:
        if not 0.0 <= self.error_rate <= 1.0:
            raise ValueError(f"annotator.error_rate must be in [0, 1], got {self.error_rate}")
        if self.max_new_tokens < 1 or self.batch_size < 1:
            raise ValueError("annotator.max_new_tokens and annotator.batch_size must be >= 1")


def build_annotator(cfg: AnnotatorConfig, device: Any) -> Annotator:
    """The annotator ``cfg`` describes; local models are loaded onto ``device`` in ``cfg.dtype``."""
    if cfg.kind == "oracle" and not cfg.synonyms:
        raise ConfigError("annotator.kind=oracle needs annotator.synonyms (e.g. <lab>/vocab/synonyms.txt)")
    if cfg.kind in ("vlm_judge", "reward_model") and not cfg.model:
        raise ConfigError(f"annotator.kind={cfg.kind} needs annotator.model (a local model folder)")
    if cfg.kind == "oracle":
        annotator: Annotator = LabOracle(read_synonyms(cfg.synonyms))
    elif cfg.kind == "reward_model":
        scorer = ScorerConfig(dtype=cfg.dtype, batch_size=cfg.batch_size)
        annotator = RewardModelAnnotator(load_scorer(cfg.model, scorer, device))
    elif cfg.kind == "vlm_judge":
        model, processor = load_vlm(cfg.model, dtype=cfg.dtype, device=device)
        params = GenerationParams(max_new_tokens=cfg.max_new_tokens)
        ask = vlm_ask(model, processor, load_judge_template(cfg.template), params, cfg.batch_size)
        annotator = PairwiseJudge(ask, "vlm_judge")
    else:
        ask = api_ask(ChatClient(cfg.endpoint), load_judge_template(cfg.template), cfg.max_new_tokens, cfg.seed)
        annotator = PairwiseJudge(ask, "api_judge")
    return NoisyAnnotator(annotator, cfg.error_rate, cfg.seed) if cfg.error_rate > 0 else annotator
