"""Scalar heads on a VLM: a reward model r(x, y) (Apple arXiv 2407.02477 Eq. 1; Stiennon et al. 2020).

``ScalarHeadModel`` runs the VLM backbone and maps the language model's final hidden state (after its last norm)
at every position to one number with a linear head, as TRL's value head does; a reward is that number at the
last real token of an answer (the EOS after it, as every collate lays rows out), as TRL's and OpenRLHF's reward
models read it. The forward passes every keyword through to the backbone (cache, positions, block masks,
``logits_to_keep``), so the shared-prefix layouts of ``mmalign.models.reward_forward`` run it unchanged, and
returns the backbone's logits too (the critique-based reward model trains its LM head and its score head in
one pass).

On disk (``save_reward_model``, or ``mmalign train rm``): the backbone as ``save_pretrained`` writes it (whole
weights, or a PEFT LoRA adapter whose base model ``reward_model.json`` names), the processor,
``reward_head.safetensors`` (``weight`` [1, H]; no bias: a Bradley-Terry loss sees only reward differences, so a
bias would get no gradient and drift under AdamW's noise; TRL's ``score`` head has none either) and
``reward_model.json`` (``RewardModelSpec``: Bradley-Terry or critique-based, and the critique separator).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NamedTuple

import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import Tensor

from mmalign.data.collate import collate_sft
from mmalign.data.schema import PreferenceRecord
from mmalign.models.loading import load_vlm
from mmalign.models.logprobs import model_inputs

HEAD_FILE = "reward_head.safetensors"
SPEC_FILE = "reward_model.json"


def last_token_index(attention_mask: Tensor) -> Tensor:
    """int64[B]: position of the last attended token of each row of attention_mask [B, T] (any padding side)."""
    if bool((attention_mask.sum(dim=-1) == 0).any()):
        raise ValueError("a row has no attended token")
    t = attention_mask.shape[-1]
    return (t - 1) - attention_mask.flip(-1).long().argmax(dim=-1)


class HeadOutput(NamedTuple):
    """logits: the backbone's logits (at its ``logits_to_keep`` positions); scores: float32[B, T], the head on
    the final hidden state of every position; past_key_values: the backbone's cache (None without one)."""

    logits: Tensor
    scores: Tensor
    past_key_values: Any


class ScalarHeadModel(torch.nn.Module):
    """A VLM ``backbone`` + ``head`` (Linear H -> 1, no bias) on the final hidden state of every position."""

    def __init__(self, backbone: Any, head: torch.nn.Linear | None = None):
        super().__init__()
        hidden = backbone.config.get_text_config().hidden_size
        self.backbone = backbone
        self.head = head if head is not None else torch.nn.Linear(hidden, 1, bias=False)
        if self.head.in_features != hidden or self.head.out_features != 1 or self.head.bias is not None:
            raise ValueError(f"head must map {hidden} -> 1 without bias, got {self.head}")

    def forward(self, **inputs: Any) -> HeadOutput:
        """The backbone on ``inputs`` (any keyword it takes), plus the head's score at every position."""
        out = self.backbone(**inputs, output_hidden_states=[-1])  # only the last state is kept
        hidden = out.hidden_states[-1]  # [B, T, H]
        scores = self.head(hidden.to(self.head.weight.dtype)).squeeze(-1).float()
        return HeadOutput(out.logits, scores, out.past_key_values)


@dataclass
class RewardModelSpec:
    """``reward_model.json``: ``kind`` (Bradley-Terry reward of the answer, or MM-RLHF's critique-based reward read
    after a critique the model writes); ``critique_separator``: the text between an answer and its critique;
    ``base_model``: for a LoRA adapter folder, the model folder the adapter applies to; ``config_hash``: the hash of
    the training config that made it (``mmalign.config.config_hash``; "" when saved outside a trainer)."""

    kind: Literal["bradley_terry", "critique"] = "bradley_terry"
    critique_separator: str = ""
    base_model: str | None = None
    config_hash: str = ""

    def __post_init__(self) -> None:
        if self.kind not in ("bradley_terry", "critique"):
            raise ValueError(f"reward model kind must be 'bradley_terry' or 'critique', got {self.kind!r}")
        if self.kind == "critique" and not self.critique_separator:
            raise ValueError("a critique reward model needs a critique_separator")


def write_head(path: str | Path, weight: Tensor, spec: RewardModelSpec) -> None:
    """Write ``reward_head.safetensors`` (``weight`` [1, H]) and ``reward_model.json`` into a backbone's folder."""
    path = Path(path)
    save_file({"weight": weight.detach().cpu().float().contiguous()}, str(path / HEAD_FILE))
    (path / SPEC_FILE).write_text(json.dumps(dataclasses.asdict(spec), indent=2) + "\n")


def save_reward_model(model: ScalarHeadModel, processor: Any, path: str | Path,
                      spec: RewardModelSpec | None = None) -> Path:
    """Write backbone + processor (``save_pretrained``), the head and the spec to ``path`` (one process)."""
    path = Path(path)
    model.backbone.save_pretrained(path)
    processor.save_pretrained(path)
    write_head(path, model.head.weight, spec or RewardModelSpec())
    return path


def read_spec(path: str | Path) -> RewardModelSpec:
    """The ``RewardModelSpec`` of a reward-model folder; a clear error for any other folder."""
    path = Path(path)
    if not (path / HEAD_FILE).is_file() or not (path / SPEC_FILE).is_file():
        raise FileNotFoundError(f"{path}: no {HEAD_FILE} + {SPEC_FILE}; not a reward model folder (written by "
                                f"mmalign train rm or save_reward_model)")
    return RewardModelSpec(**json.loads((path / SPEC_FILE).read_text()))


def load_reward_model(path: str | Path, *, dtype: str | None = None, device: Any = None) -> tuple[ScalarHeadModel, Any]:
    """(reward model in eval mode, processor) from a reward-model folder (``read_spec``).

    A LoRA adapter folder is applied to its ``base_model`` and merged, so scoring runs at the base model's speed.
    """
    from peft import PeftModel

    path = Path(path)
    spec = read_spec(path)
    if (path / "adapter_config.json").is_file():
        if spec.base_model is None or not Path(spec.base_model).is_dir():
            raise FileNotFoundError(f"{path}: a LoRA reward model needs its base model folder, "
                                    f"{SPEC_FILE} names {spec.base_model!r}")
        backbone, processor = load_vlm(spec.base_model, dtype=dtype)
        backbone = PeftModel.from_pretrained(backbone, path).merge_and_unload()
    else:
        backbone, processor = load_vlm(path, dtype=dtype)
    state = load_file(str(path / HEAD_FILE))
    head = torch.nn.Linear(state["weight"].shape[1], 1, bias=False)
    head.load_state_dict(state)
    model = ScalarHeadModel(backbone, head)
    return (model.to(device) if device is not None else model).eval(), processor


def reward_scores(model: ScalarHeadModel, processor: Any, records: Sequence[PreferenceRecord],
                  images: Sequence[list[Image.Image]], answers: Sequence[str], batch_size: int = 16) -> Tensor:
    """float32[N]: r(prompt of records[i] with images[i], answers[i]), one row per answer, without gradients."""
    scores = []
    device = next(model.parameters()).device
    with torch.no_grad():
        for start in range(0, len(answers), batch_size):
            chunk = range(start, min(start + batch_size, len(answers)))
            rows = [dataclasses.replace(records[i], chosen=answers[i], rejected=[]) for i in chunk]
            batch = collate_sft(processor, rows, [images[i] for i in chunk])
            inputs = {k: v.to(device, dtype=model.backbone.dtype) if v.is_floating_point() else v.to(device)
                      for k, v in model_inputs(batch).items()}
            out = model(**inputs, logits_to_keep=1, use_cache=False)
            last = last_token_index(inputs["attention_mask"])
            scores.append(out.scores[torch.arange(len(last), device=last.device), last])
    return torch.cat(scores) if scores else torch.zeros(0)
