"""The V3 demo's text side: a sentencepiece tokenizer trained on the captions and a tiny T5 v1.1 encoder
(the V5.1 demo's Qwen2-VL side is `text_v51`; `train_text(..., family="v51")` builds it).

    python -m easyanimate train-text --data DATA --out RUN

writes `RUN/tokenizer/` (spiece.model + tokenizer_config.json) and `RUN/text_encoder/` (config.json +
model.safetensors), the layout of a release, so `easyanimate.text.load_text_encoder(RUN)` loads them.

The encoder keeps its random initial weights (seeded) and is frozen: the transformer's caption
projection and cross-attention learn to read its outputs, as a real DiT learns to read a frozen T5.
With a word-level vocabulary of a few dozen words, a random 2-layer T5 keeps each word's identity in
its output (its residual stream is dominated by the token embedding) and adds position and context,
which is all the captions need; training it as well did not look necessary for this vocabulary.
"""
from __future__ import annotations

import io
import json
from pathlib import Path

import torch

from .common import save_weights, setup

# The tiny T5 v1.1 encoder (gated-GELU, relative position buckets), `d_model` = the DiT's caption_channels.
DEMO_T5_CONFIG = {
    "architectures": ["T5EncoderModel"],
    "model_type": "t5",
    "d_model": 64,
    "d_kv": 16,
    "num_heads": 4,
    "d_ff": 128,
    "num_layers": 2,
    "feed_forward_proj": "gated-gelu",
    "relative_attention_num_buckets": 32,
    "relative_attention_max_distance": 128,
    "layer_norm_epsilon": 1e-6,
    "dropout_rate": 0.0,
    "is_encoder_decoder": False,
    "use_cache": False,
    "tie_word_embeddings": False,
    "initializer_factor": 1.0,
}

SPECIAL_PIECES = {"pad": (0, "<pad>"), "eos": (1, "</s>"), "unk": (2, "<unk>")}


def train_tokenizer(captions: list[str], folder, vocab_size: int = 200) -> Path:
    """A word-level sentencepiece model with T5's special ids (<pad> 0, </s> 1, <unk> 2), no sentinels.

    `vocab_size` is an upper bound: a word model keeps every distinct word up to it. Captions are
    cleaned the way prompts will be (`preprocess_prompt`) so training and inference see the same words.
    """
    import sentencepiece as spm

    from ..text import preprocess_prompt

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    sentences = sorted({preprocess_prompt(c) for c in captions if c.strip()})
    words = {w for s in sentences for w in s.split()}
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences), model_writer=model, model_type="word",
        vocab_size=min(vocab_size, len(words) + len(SPECIAL_PIECES)), hard_vocab_limit=False,
        pad_id=0, pad_piece="<pad>", eos_id=1, eos_piece="</s>", unk_id=2, unk_piece="<unk>", bos_id=-1,
        character_coverage=1.0, minloglevel=2, num_threads=1,
    )
    (folder / "spiece.model").write_bytes(model.getvalue())
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "T5Tokenizer", "extra_ids": 0, "model_max_length": 120, "legacy": True,
        "pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>",
    }, indent=2) + "\n")
    (folder / "special_tokens_map.json").write_text(json.dumps(
        {"pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>"}, indent=2) + "\n")
    return folder


def build_text_encoder(folder, vocab_size: int, seed: int, config: dict | None = None) -> Path:
    """A seeded random T5 encoder saved as a release `text_encoder/` folder."""
    from transformers import T5Config, T5EncoderModel

    config = dict(config or DEMO_T5_CONFIG, vocab_size=vocab_size)
    torch.manual_seed(seed)
    model = T5EncoderModel(T5Config.from_dict(config))
    state = {k: v for k, v in model.state_dict().items() if k != "encoder.embed_tokens.weight"}  # tied to shared
    return save_weights(folder, state, config, dtype=torch.float16, weights_name="model.safetensors")


DEFAULT_VOCAB_SIZES = {"v3": 200, "v51": 1000}  # an upper bound: word pieces (v3), bytes + BPE merges (v51)


def train_text(data: str, out: str, seed: int = 0, vocab_size: int | None = None, captions: list[str] | None = None,
               family: str = "v3") -> Path:
    """Tokenizer + encoder for the captions of a data folder (plus any extra `captions`); returns `out`.
    `family` "v3": sentencepiece + T5 (this module); "v51": Qwen2 BPE + Qwen2-VL (`text_v51`)."""
    from ..text import T5PromptTokenizer
    from .data import read_folder

    if family not in DEFAULT_VOCAB_SIZES:
        raise ValueError(f"Unknown text training family '{family}'; use one of {', '.join(DEFAULT_VOCAB_SIZES)}.")
    vocab_size = vocab_size or DEFAULT_VOCAB_SIZES[family]
    setup(seed)
    clips = read_folder(data) if data else None
    texts = list(captions or [])
    if clips is not None:
        texts += clips.captions + clips.image_captions
    if family == "v51":
        from .text_v51 import train_text_v51

        return train_text_v51(texts, out, seed, vocab_size)
    out = Path(out)
    tokenizer_dir = train_tokenizer(texts, out / "tokenizer", vocab_size)
    tokenizer = T5PromptTokenizer.from_path(tokenizer_dir)
    build_text_encoder(out / "text_encoder", tokenizer.vocab_size, seed)
    print(f"tokenizer: {tokenizer.vocab_size} pieces; text encoder d_model {DEMO_T5_CONFIG['d_model']}; wrote {out}",
          flush=True)
    return out
