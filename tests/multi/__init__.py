"""MuLTI tests. `tiny_config` is a model small enough for a unit test to build and run in well under a second."""
from __future__ import annotations


def tiny_config(**overrides):
    """A few-thousand-parameter MuLTI: 32-px frames cut in 8-px patches (4x4 grid), d 32, 2+2 encoder
    layers, sampler K = 2 with grid (4, 2, 2) and text condensed beyond 16 tokens; 3 tags, 5 answers.
    Token ids 0..4 are [PAD] [UNK] [CLS] [SEP] [MASK]. Keyword overrides replace top-level keys; the
    `sampler`, `adapter`, `vision` and `text` sections are merged."""
    from easyanimate.multi.config import MuLTIConfig

    config = {
        "vision_backbone": "vit",
        "vision": {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64,
                   "patch_size": 8, "num_channels": 3, "hidden_dropout_prob": 0.0,
                   "attention_probs_dropout_prob": 0.0},
        "text": {"vocab_size": 64, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
                 "intermediate_size": 64, "max_position_embeddings": 160, "hidden_dropout_prob": 0.0,
                 "attention_probs_dropout_prob": 0.0, "pad_token_id": 0},
        "num_frames": 4,
        "max_frames": 32,
        "image_size": 32,
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
        "sampler": {"layers": 2, "heads": 2, "grid": [4, 2, 2], "guide_dim": 16, "text_keep_max": 16},
        "adapter": {"enable": False, "n_frozen_vision": 1, "n_frozen_text": 1, "attention_dim": 16, "heads": 2},
        "embed_dim": 16,
        "mask_token_id": 4,
        "special_token_ids": [0, 1, 2, 3, 4],
        "tags": ["red", "moving", "square"],
        "answers": ["red", "blue", "left", "right", "circle"],
    }
    for key, value in overrides.items():
        if key in ("sampler", "adapter", "vision", "text"):
            config[key] = {**config[key], **value}
        else:
            config[key] = value
    return MuLTIConfig.from_dict(config)


def text_batch(batch: int, length: int, valid=None, vocab: int = 64, seed: int = 0):
    """(ids, mask): [CLS] + random word ids + [SEP], right-padded with [PAD] to `length`;
    `valid` = real tokens per row (default: all)."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (batch, length), generator=generator)
    mask = torch.zeros(batch, length, dtype=torch.long)
    for row, n in enumerate(valid or [length] * batch):
        ids[row, 0], ids[row, n - 1] = 2, 3
        ids[row, n:] = 0
        mask[row, :n] = 1
    return ids, mask
