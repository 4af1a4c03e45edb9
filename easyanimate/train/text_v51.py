"""The V5.1 demo's text side: a byte-level BPE tokenizer trained on the captions and a tiny Qwen2-VL
language model.

    python -m easyanimate train-text --family v51 --synthetic-vocabulary --out RUN

writes `RUN/tokenizer/` (vocab.json, merges.txt, tokenizer_config.json, chat_template.json: what a V5.1
release ships there) and `RUN/text_encoder/` (a flat Qwen2-VL config.json + model.safetensors with the
release's `model.*` key names), so `easyanimate.text_v5.load_text_encoder_v5(RUN)` loads them through the
same path as a downloaded V5.1 release: Qwen2's tokenizer class, the chat template, the input of the last
decoder layer as the embedding.

The tokenizer is Qwen2's kind (byte-level BPE behind Qwen2's pre-tokenizer, its special tokens, pad
`<|endoftext|>`), its merges learnt from every caption wrapped in the chat template, so each caption word
and template word is one token; any other text still encodes, byte by byte. `model_max_length` is
`TEXT_TOKENS`: the V5.1 text encoding pads every prompt to min(model_max_length, 256) tokens and the
transformer attends all of them, so a short length keeps the demo's joint attention small.

The language model keeps its seeded random initial weights and is frozen, as the V3 demo's T5 was
(easyanimate/demo/README.md): with a vocabulary of a few dozen words, the token embeddings carry each
word's identity through two random decoder layers, which add position and (causal) context; the
transformer's text projection and joint attention learn to read them. Its vision tower is not saved:
EasyAnimate reads text only (the loader never builds it).
"""
from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import torch

from .common import save_weights, setup

# Qwen2-VL's special tokens, in Qwen's order (they follow the learnt vocabulary, as in Qwen's own files).
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|image_pad|>", "<|video_pad|>"]
PAD_TOKEN, END_OF_TURN = "<|endoftext|>", "<|im_end|>"

# Prompts are padded to this many tokens: the template's 19 and a caption of up to 10 words, with room.
TEXT_TOKENS = 32

# The chat template, written for this demo to give what Qwen2-VL's template gives for a text-only user
# turn: the default system turn first, the turn itself, then the assistant header (add_generation_prompt).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# A tiny Qwen2-VL in the release's flat config layout. hidden_size is the transformer's text_embed_dim.
# Three decoder layers, of which the embedding uses two (it is the last layer's input). M-RoPE sections
# split the 16-wide heads' 8 frequency pairs as the 7B model splits its 64 (16 : 24 : 24).
DEMO_QWEN_CONFIG = {
    "architectures": ["Qwen2VLForConditionalGeneration"],
    "model_type": "qwen2_vl",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "hidden_act": "silu",
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0,
    "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]},
    "max_position_embeddings": 256,
    "attention_dropout": 0.0,
    "use_sliding_window": False,
    "sliding_window": 256,
    "max_window_layers": 3,
    "tie_word_embeddings": False,
    "initializer_range": 0.02,
    "torch_dtype": "float16",
    # Qwen2-VL configs carry one; EasyAnimate never runs the vision tower, and its weights are not saved.
    "vision_config": {"depth": 1, "embed_dim": 16, "mlp_ratio": 2, "num_heads": 2, "in_chans": 3, "hidden_size": 64,
                      "patch_size": 14, "spatial_merge_size": 2, "spatial_patch_size": 14, "temporal_patch_size": 2},
}


# ------------------------------------------------------------------------------------------ tokenizer
def chat_text(prompt: str) -> str:
    """`prompt` as one user turn of CHAT_TEMPLATE with the generation prompt: what the V5.1 text encoder
    tokenises (rendered here with jinja2, as transformers renders chat templates)."""
    import jinja2

    messages = [{"role": "user", "content": [{"type": "text", "text": prompt}]}]
    return jinja2.Environment().from_string(CHAT_TEMPLATE).render(messages=messages, add_generation_prompt=True)


def _plain_segments(text: str) -> list[str]:
    """The parts of a templated text between special tokens (which are added tokens, never merged)."""
    pattern = "|".join(re.escape(token) for token in SPECIAL_TOKENS)
    return [part for part in re.split(pattern, text) if part]


def learn_bpe(texts: list[str], vocab_size: int) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """(vocab, merges) of a byte-level BPE learnt on `texts` behind Qwen2's normaliser and pre-tokenizer.

    The vocabulary starts from all 256 byte symbols, so nothing is ever unknown; merges are learnt until
    every pre-token (a word with its leading space, a run of punctuation or newlines) is one symbol, or
    `vocab_size` is reached."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=1, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts, trainer)
    model = json.loads(tokenizer.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    return model["vocab"], merges


def train_tokenizer(captions: list[str], folder, vocab_size: int = 1000):
    """A Qwen2 tokenizer for `captions` (plus the empty prompt and the chat template) written to `folder`
    in the V5.1 release's layout; returns the loaded tokenizer."""
    from transformers import Qwen2Tokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    texts = sorted({chat_text(c) for c in captions} | {chat_text("")})
    vocab, merges = learn_bpe([part for text in texts for part in _plain_segments(text)], vocab_size)
    special_ids = {token: len(vocab) + i for i, token in enumerate(SPECIAL_TOKENS)}
    tokenizer = Qwen2Tokenizer(vocab={**vocab, **special_ids}, merges=merges, unk_token=None, bos_token=None,
                               eos_token=END_OF_TURN, pad_token=PAD_TOKEN)
    tokenizer.add_special_tokens({"additional_special_tokens": [t for t in SPECIAL_TOKENS if t not in (PAD_TOKEN, END_OF_TURN)]})
    tokenizer.model_max_length = TEXT_TOKENS
    tokenizer.save_pretrained(str(folder))
    write_classic_files(folder, vocab, merges, special_ids)
    return Qwen2Tokenizer.from_pretrained(str(folder))


def write_classic_files(folder: Path, vocab: dict, merges: list, special_ids: dict) -> None:
    """What a V5.1 release's tokenizer/ holds besides tokenizer.json, for transformers versions that read
    those instead: vocab.json and merges.txt (the learnt BPE, without the special tokens), the special
    tokens with their ids in tokenizer_config.json's `added_tokens_decoder`, and the chat template in
    chat_template.json (not in tokenizer_config.json)."""
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False) + "\n")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    config_file = folder / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config.pop("chat_template", None)
    config.pop("extra_special_tokens", None)  # a list in transformers 5, a dict of named tokens before it
    config["additional_special_tokens"] = [t for t in SPECIAL_TOKENS if t not in (PAD_TOKEN, END_OF_TURN)]
    config["added_tokens_decoder"] = {
        str(index): {"content": token, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
                     "special": True}
        for token, index in special_ids.items()
    }
    config_file.write_text(json.dumps(config, indent=2) + "\n")
    (folder / "chat_template.jinja").unlink(missing_ok=True)
    (folder / "chat_template.json").write_text(json.dumps({"chat_template": CHAT_TEMPLATE}, indent=2) + "\n")


# ------------------------------------------------------------------------------------------ encoder
def qwen_config(tokenizer, overrides: dict | None = None) -> dict:
    """DEMO_QWEN_CONFIG with the tokenizer's vocabulary size and special-token ids."""
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in SPECIAL_TOKENS}
    # a deep copy: transformers' config classes rewrite nested dicts such as rope_scaling in place
    return {**copy.deepcopy(DEMO_QWEN_CONFIG), **copy.deepcopy(overrides or {}), "vocab_size": len(tokenizer),
            "bos_token_id": ids[PAD_TOKEN], "eos_token_id": ids[END_OF_TURN], "pad_token_id": ids[PAD_TOKEN],
            "vision_start_token_id": ids["<|vision_start|>"], "vision_end_token_id": ids["<|vision_end|>"],
            "image_token_id": ids["<|image_pad|>"], "video_token_id": ids["<|video_pad|>"]}


def build_text_encoder(folder, config: dict, seed: int) -> Path:
    """transformers' Qwen2-VL language model with its seeded initial weights, saved as a release
    `text_encoder/` folder (key names `model.*`, as in the released files)."""
    from transformers import Qwen2VLConfig
    from transformers.models.qwen2_vl import modeling_qwen2_vl

    full = Qwen2VLConfig.from_dict(copy.deepcopy(config))
    text_config = getattr(full, "text_config", None) or full
    model_class = getattr(modeling_qwen2_vl, "Qwen2VLTextModel", None) or modeling_qwen2_vl.Qwen2VLModel
    torch.manual_seed(seed)
    model = model_class(text_config)
    state = {f"model.{key}": value for key, value in model.state_dict().items()}
    return save_weights(folder, state, config, dtype=torch.float16, weights_name="model.safetensors")


def train_text_v51(captions: list[str], out, seed: int = 0, vocab_size: int = 1000) -> Path:
    """tokenizer/ + text_encoder/ for `captions` in `out`; returns `out`."""
    setup(seed)
    out = Path(out)
    tokenizer = train_tokenizer(captions, out / "tokenizer", vocab_size)
    config = qwen_config(tokenizer)
    build_text_encoder(out / "text_encoder", config, seed)
    print(f"tokenizer: {len(tokenizer)} tokens ({TEXT_TOKENS} per prompt); Qwen2-VL text encoder width "
          f"{config['hidden_size']}, {config['num_hidden_layers']} layers; wrote {out}", flush=True)
    return out
