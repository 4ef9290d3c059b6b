"""The lab base model: a tiny LLaVA (small CLIP vision tower + small Llama) with a local word tokenizer.

Built only through the public ``transformers`` API, so every stage treats it like any other LLaVA
checkpoint (``save_pretrained`` / ``AutoModelForImageTextToText`` / ``AutoProcessor``). Images are 128x128
with 8x8 patches: 256 image tokens, so BDHS's rho = 0.99 leaves 2.6 tokens visible on average and hides
all of them in 8 % of masks (with the earlier 64 tokens: 0.6 and 53 %). 16x16 patches on 64x64 images (16
tokens) left an earlier model blind for 1,000 SFT steps (docs/lab.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)

from mmalign.lab.texts import CHAT_TEMPLATE, corpus

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>", "<image>"]


@dataclass
class LabModelConfig:
    """Sizes of the tiny LLaVA. ``image_size / patch_size`` squared is the image-token count."""

    image_size: int = 128
    patch_size: int = 8
    vision_hidden: int = 128
    vision_layers: int = 3
    text_hidden: int = 128
    text_layers: int = 3
    heads: int = 4

    def __post_init__(self) -> None:
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Word-level tokenizer trained on the lab corpus; the decoder drops spaces before punctuation."""
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    # WordPiece's cleanup turns "circle ." back into "circle." when decoding; no token carries "##".
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    tok.train_from_iterator(corpus(), trainers.WordLevelTrainer(special_tokens=SPECIAL_TOKENS))
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
        extra_special_tokens={"image_token": "<image>"}, padding_side="left",
    )


def build_processor(cfg: LabModelConfig) -> LlavaProcessor:
    side = {"height": cfg.image_size, "width": cfg.image_size}
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": cfg.image_size}, crop_size=side)
    return LlavaProcessor(
        image_processor=image_processor, tokenizer=build_tokenizer(), patch_size=cfg.patch_size,
        vision_feature_select_strategy="default", num_additional_image_tokens=1, chat_template=CHAT_TEMPLATE,
    )


def build_lab_model(cfg: LabModelConfig, seed: int = 0) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """Randomly initialised tiny LLaVA and its processor (deterministic for ``seed``)."""
    processor = build_processor(cfg)
    tok = processor.tokenizer
    n_patches = (cfg.image_size // cfg.patch_size) ** 2
    vision = CLIPVisionConfig(
        hidden_size=cfg.vision_hidden, intermediate_size=4 * cfg.vision_hidden, num_hidden_layers=cfg.vision_layers,
        num_attention_heads=cfg.heads, image_size=cfg.image_size, patch_size=cfg.patch_size,
    )
    text = LlamaConfig(
        vocab_size=len(tok), hidden_size=cfg.text_hidden, intermediate_size=4 * cfg.text_hidden,
        num_hidden_layers=cfg.text_layers, num_attention_heads=cfg.heads, num_key_value_heads=cfg.heads,
        max_position_embeddings=n_patches + 128, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, tie_word_embeddings=True,
    )
    config = LlavaConfig(
        vision_config=vision, text_config=text, image_token_index=tok.convert_tokens_to_ids("<image>"),
        image_seq_length=n_patches, vision_feature_layer=-1, vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    # With the default N(0, 0.02) init the two projector layers shrink the differences between images
    # ~25x below the text-embedding scale; the LM then learns to ignore the image tokens and the vision
    # tower's gradient dies (measured: 1e-5 after 1000 steps, blind captions). Xavier keeps them visible.
    for layer in (model.model.multi_modal_projector.linear_1, model.model.multi_modal_projector.linear_2):
        torch.nn.init.xavier_uniform_(layer.weight)
        torch.nn.init.zeros_(layer.bias)
    gen = model.generation_config
    gen.pad_token_id, gen.eos_token_id, gen.bos_token_id = tok.pad_token_id, tok.eos_token_id, tok.bos_token_id
    return model, processor
