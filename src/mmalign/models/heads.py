"""Scalar heads on a VLM: a reward model r(x, y) (Apple arXiv 2407.02477 Eq. 1; Stiennon et al. 2020).

``ScalarHeadModel`` reads the language model's last-layer hidden state at the last real token of each
sequence (the EOS after the answer, as ``collate_sft`` lays rows out) and maps it to one number with a linear
head, as TRL's and OpenRLHF's reward models do. On disk: the backbone and processor as ``save_pretrained``
writes them, plus ``reward_head.safetensors`` (``weight`` [1, H], ``bias`` [1]).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import Tensor

from mmalign.data.collate import collate_sft
from mmalign.data.schema import PreferenceRecord
from mmalign.models.loading import load_vlm
from mmalign.models.logprobs import model_inputs

HEAD_FILE = "reward_head.safetensors"


def last_token_index(attention_mask: Tensor) -> Tensor:
    """int64[B]: position of the last attended token of each row of attention_mask [B, T] (any padding side)."""
    if bool((attention_mask.sum(dim=-1) == 0).any()):
        raise ValueError("a row has no attended token")
    t = attention_mask.shape[-1]
    return (t - 1) - attention_mask.flip(-1).long().argmax(dim=-1)


class ScalarHeadModel(torch.nn.Module):
    """A VLM ``backbone`` + ``head`` (Linear H -> 1) on the final hidden state of each row's last token."""

    def __init__(self, backbone: Any, head: torch.nn.Linear | None = None):
        super().__init__()
        hidden = backbone.config.get_text_config().hidden_size
        self.backbone = backbone
        self.head = head if head is not None else torch.nn.Linear(hidden, 1)
        if self.head.in_features != hidden or self.head.out_features != 1:
            raise ValueError(f"head must map {hidden} -> 1, got {self.head.in_features} -> {self.head.out_features}")

    def forward(self, **inputs: Any) -> Tensor:
        """Scores float32[B] of a batch (``input_ids``/``attention_mask`` [B, T] + image tensors)."""
        out = self.backbone(**inputs, output_hidden_states=True, logits_to_keep=1, use_cache=False)
        hidden = out.hidden_states[-1]  # [B, T, H]
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        last = hidden[rows, last_token_index(inputs["attention_mask"])]  # [B, H]
        return self.head(last.to(self.head.weight.dtype)).squeeze(-1).float()


def save_reward_model(model: ScalarHeadModel, processor: Any, path: str | Path) -> Path:
    """Write backbone + processor (``save_pretrained``) and the head to ``path``."""
    path = Path(path)
    model.backbone.save_pretrained(path)
    processor.save_pretrained(path)
    head = {"weight": model.head.weight.detach().cpu().contiguous(), "bias": model.head.bias.detach().cpu()}
    save_file(head, str(path / HEAD_FILE))
    return path


def load_reward_model(path: str | Path, *, dtype: str | None = None, device: Any = None) -> tuple[ScalarHeadModel, Any]:
    """(reward model in eval mode, processor) from a folder written by ``save_reward_model``."""
    path = Path(path)
    if not (path / HEAD_FILE).is_file():
        raise FileNotFoundError(f"{path}: no {HEAD_FILE}; not a reward model folder (see save_reward_model)")
    backbone, processor = load_vlm(path, dtype=dtype, device=device)
    state = load_file(str(path / HEAD_FILE))
    head = torch.nn.Linear(state["weight"].shape[1], 1)
    head.load_state_dict(state)
    model = ScalarHeadModel(backbone, head.to(backbone.device))
    return model.eval(), processor


def reward_scores(model: ScalarHeadModel, processor: Any, records: Sequence[PreferenceRecord],
                  images: Sequence[list[Image.Image]], answers: Sequence[str], batch_size: int = 16) -> Tensor:
    """float32[N]: r(prompt of records[i] with images[i], answers[i]), without gradients."""
    scores = []
    device = next(model.parameters()).device
    with torch.no_grad():
        for start in range(0, len(answers), batch_size):
            chunk = range(start, min(start + batch_size, len(answers)))
            rows = [dataclasses.replace(records[i], chosen=answers[i], rejected=[]) for i in chunk]
            batch = collate_sft(processor, rows, [images[i] for i in chunk])
            inputs = {k: v.to(device, dtype=model.backbone.dtype) if v.is_floating_point() else v.to(device)
                      for k, v in model_inputs(batch).items()}
            scores.append(model(**inputs))
    return torch.cat(scores) if scores else torch.zeros(0)
