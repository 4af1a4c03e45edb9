"""Tiny EasyAnimate V5 / V5.1 release folders in the real layouts, for loader, pipeline, node and CLI tests.

V5.1: a tiny Qwen2-VL (release-era flat config.json, release key names `model.*` / `visual.*` / `lm_head.weight`,
sharded with an index) with a byte-level BPE tokenizer whose chat template is in chat_template.json as in
the releases; a tiny MMDiT transformer (original key layout) and V5 VAE; the flow scheduler config.
V5: the same transformer and VAE with two text streams, a tiny Bert (text_encoder/, WordPiece vocab.txt) and
a tiny mT5 encoder (text_encoder_2/, sentencepiece model from tests/release.py), and a DDPM-family scheduler.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

# A Qwen2-VL-style template written for these tests (the real one is exercised by the parity fixture):
# a default system turn before the first user turn, text parts of list contents, the generation prompt.
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}<|im_start|>system\n"
    "You are a helpful assistant.<|im_end|>\n{% endif %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
QWEN_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                "<|image_pad|>", "<|video_pad|>"]
QWEN_MAX_LENGTH = 96  # the tiny tokenizer's model_max_length: prompts get min(96, 256) tokens

def randomize(model: torch.nn.Module, seed: int) -> None:
    """Every parameter random and non-negligible (norm weights around 1), so every path shows in outputs."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if "norm" in name.lower():
                param.copy_(1 + 0.3 * noise if name.endswith("weight") else 0.1 * noise)
            else:
                param.copy_(noise * (0.5 if "embed" in name else 0.15))


def write_sharded(folder, state: dict, dtype=None) -> None:
    """`model-0000N-of-00002.safetensors` + `model.safetensors.index.json`, as the releases ship them."""
    names = sorted(state)
    shards = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    weight_map = {}
    for shard, keys in shards.items():
        tensors = {k: (state[k].to(dtype) if dtype is not None and state[k].is_floating_point() else state[k]).contiguous()
                   for k in keys}
        save_file(tensors, str(folder / shard), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(keys, shard))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def qwen_tokenizer(folder) -> None:
    """A byte-level BPE with every byte, a few merges and Qwen's special tokens; chat template in
    chat_template.json (the release layout), not in tokenizer_config.json."""
    from transformers import Qwen2Tokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    vocab = {c: i for i, c in enumerate(bytes_to_unicode().values())}
    merges = [("Ġ", "c"), ("a", "t"), ("Ġc", "at"), ("Ġ", "s"), ("n", "o"), ("Ġs", "no"), ("Ġsno", "w"), ("i", "n")]
    for pair in merges:
        vocab["".join(pair)] = len(vocab)
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=merges, unk_token=None, bos_token=None, eos_token="<|im_end|>",
                               pad_token="<|endoftext|>")
    tokenizer.add_special_tokens({"additional_special_tokens": QWEN_SPECIAL[1:]})
    tokenizer.model_max_length = QWEN_MAX_LENGTH
    tokenizer.save_pretrained(str(folder))
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    (folder / "chat_template.json").write_text(json.dumps({"chat_template": CHAT_TEMPLATE}))


def qwen_config(vocab_size: int, ids: dict) -> dict:
    """A release-era flat Qwen2-VL config.json, shrunk."""
    return {
        "architectures": ["Qwen2VLForConditionalGeneration"], "model_type": "qwen2_vl",
        "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 3, "num_attention_heads": 4,
        "num_key_value_heads": 2, "max_position_embeddings": 256, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
        "hidden_act": "silu", "vocab_size": vocab_size, "tie_word_embeddings": False, "attention_dropout": 0.0,
        "use_sliding_window": False, "sliding_window": 256, "max_window_layers": 3, "torch_dtype": "float32",
        "bos_token_id": ids["<|endoftext|>"], "eos_token_id": ids["<|im_end|>"], "pad_token_id": ids["<|endoftext|>"],
        "vision_start_token_id": ids["<|vision_start|>"], "vision_end_token_id": ids["<|vision_end|>"],
        "image_token_id": ids["<|image_pad|>"], "video_token_id": ids["<|video_pad|>"],
        "rope_scaling": {"type": "mrope", "mrope_section": [2, 1, 1]},
        "vision_config": {"depth": 1, "embed_dim": 16, "mlp_ratio": 2, "num_heads": 2, "in_chans": 3, "hidden_size": 32,
                          "patch_size": 14, "spatial_merge_size": 2, "spatial_patch_size": 14, "temporal_patch_size": 2},
    }


def release_keys(state: dict) -> dict:
    """transformers 5's Qwen2-VL names -> the names in the released files."""
    out = {}
    for key, value in state.items():
        if key.startswith("model.language_model."):
            key = "model." + key[len("model.language_model."):]
        elif key.startswith("model.visual."):
            key = "visual." + key[len("model.visual."):]
        out[key] = value
    return out


TINY_MMDIT = {"num_attention_heads": 2, "attention_head_dim": 16, "num_layers": 3, "mmdit_layers": 2,
              "time_embed_dim": 16, "text_embed_dim": 32}
TINY_VAE_V5 = {"block_out_channels": [8, 8, 16, 16], "norm_num_groups": 4, "layers_per_block": 1}
FLOW_SCHEDULER = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 1.0,
                  "use_dynamic_shifting": False, "base_shift": 0.5, "max_shift": 1.15, "base_image_seq_len": 256,
                  "max_image_seq_len": 4096, "invert_sigmas": False, "shift_terminal": None,
                  "use_karras_sigmas": False, "use_exponential_sigmas": False, "use_beta_sigmas": False,
                  "time_shift_type": "exponential", "stochastic_sampling": False}
IN_CHANNELS = {"t2v": 16, "inp": 33, "control": 48, "camera": 38}
# V5's scheduler/: a DDPM-family config (the V5 file's own values were not seen); every V5 sampler is built
# from it.
DDPM_SCHEDULER = {"_class_name": "DDIMScheduler", "num_train_timesteps": 1000, "beta_start": 0.0001,
                  "beta_end": 0.02, "beta_schedule": "linear", "prediction_type": "epsilon",
                  "steps_offset": 1, "clip_sample": False}

BERT_VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "cat", "walk", "##s", "##ing", "in", "the",
              "snow", ",", ".", "dog", "run", "blur", "##ry", "low", "quality", "猫", "在", "雪", "中", "走", "行", "一", "只"]
TINY_BERT = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                 max_position_embeddings=80, type_vocab_size=2, hidden_dropout_prob=0.0,
                 attention_probs_dropout_prob=0.0, layer_norm_eps=1e-12)
TINY_MT5 = dict(d_model=24, d_kv=8, num_heads=3, d_ff=48, num_layers=2, feed_forward_proj="gated-gelu",
                relative_attention_num_buckets=32, relative_attention_max_distance=128, layer_norm_epsilon=1e-6,
                vocab_size=160, dropout_rate=0.0, tie_word_embeddings=False, decoder_start_token_id=0,
                pad_token_id=0, eos_token_id=1)


def write_bert_mt5_release_parts(root: Path):
    """V5's text parts under `root`: tokenizer/ + text_encoder/ (Bert, with its pooler and the position_ids
    buffer older transformers saved) and tokenizer_2/ + text_encoder_2/ (mT5 encoder, sharded). Returns
    transformers' (BertModel, T5EncoderModel) with the same weights."""
    from transformers import BertConfig, BertModel, T5Config, T5EncoderModel

    from release import write_tokenizer

    root = Path(root)
    tokenizer = root / "tokenizer"
    tokenizer.mkdir(parents=True)
    (tokenizer / "vocab.txt").write_text("\n".join(BERT_VOCAB) + "\n")
    (tokenizer / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "BertTokenizer", "do_lower_case": True, "tokenize_chinese_chars": True,
         "model_max_length": 77, "cls_token": "[CLS]", "sep_token": "[SEP]", "pad_token": "[PAD]",
         "unk_token": "[UNK]", "mask_token": "[MASK]"}))
    write_tokenizer(root / "tokenizer_2")

    torch.manual_seed(0)
    bert = BertModel(BertConfig(vocab_size=len(BERT_VOCAB), **TINY_BERT)).eval()
    randomize(bert, seed=2)
    folder = root / "text_encoder"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({**bert.config.to_dict(), "architectures": ["BertModel"]}))
    state = {k: v.contiguous() for k, v in bert.state_dict().items()}
    state["embeddings.position_ids"] = torch.arange(TINY_BERT["max_position_embeddings"]).unsqueeze(0)
    save_file(state, str(folder / "model.safetensors"))

    t5 = T5EncoderModel(T5Config(**TINY_MT5)).eval()
    randomize(t5, seed=3)
    t5.set_input_embeddings(t5.shared)
    folder = root / "text_encoder_2"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(
        {**t5.config.to_dict(), "model_type": "mt5", "architectures": ["MT5EncoderModel"]}))
    write_sharded(folder, {k: v for k, v in t5.state_dict().items() if k != "encoder.embed_tokens.weight"})
    return bert, t5


def write_qwen_release_parts(root: Path, seed: int = 1):
    """tokenizer/ and text_encoder/ of a tiny V5.1 release; returns (config dict, tokenizer)."""
    from transformers import AutoTokenizer, Qwen2VLConfig, Qwen2VLForConditionalGeneration

    (root / "tokenizer").mkdir(parents=True)
    qwen_tokenizer(root / "tokenizer")
    tokenizer = AutoTokenizer.from_pretrained(str(root / "tokenizer"))
    tokenizer.chat_template = CHAT_TEMPLATE
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIAL}
    config = qwen_config(len(tokenizer), ids)
    torch.manual_seed(0)
    model = Qwen2VLForConditionalGeneration(Qwen2VLConfig.from_dict(config)).eval()
    randomize(model, seed=seed)
    folder = root / "text_encoder"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    write_sharded(folder, release_keys(model.state_dict()))
    return config, tokenizer, model


def make_release_v51(folder: Path, variant: str = "t2v", seed: int = 0) -> Path:
    """A complete tiny V5.1 release: transformer/ (original layout), vae/, text_encoder/ + tokenizer/ (Qwen2-VL),
    scheduler/ (flow). `variant`: t2v, inp, control or camera (its input channels)."""
    folder = Path(folder)
    qwen, _, _ = write_qwen_release_parts(folder)
    _write_transformer_vae_scheduler(folder, "v51", {"text_embed_dim": qwen["hidden_size"]}, variant, seed,
                                     FLOW_SCHEDULER)
    return folder


def make_release_v5(folder: Path, variant: str = "inp", seed: int = 0) -> Path:
    """A complete tiny V5 release: transformer/ (original layout, two text streams), vae/, text_encoder/ +
    tokenizer/ (Bert), text_encoder_2/ + tokenizer_2/ (mT5), scheduler/ (DDPM family). `variant`: t2v or inp."""
    folder = Path(folder)
    write_bert_mt5_release_parts(folder)
    text = {"text_embed_dim": TINY_BERT["hidden_size"], "text_embed_dim_t5": TINY_MT5["d_model"]}
    _write_transformer_vae_scheduler(folder, "v5", text, variant, seed, DDPM_SCHEDULER)
    return folder


def _write_transformer_vae_scheduler(folder: Path, family: str, text: dict, variant: str, seed: int,
                                     scheduler: dict) -> None:
    from easyanimate.models.mmdit import EasyAnimateMMDiT, MMDiTConfig, family_preset
    from easyanimate.vae import build_vae

    config = {**family_preset(family), **TINY_MMDIT, **text, "in_channels": IN_CHANNELS[variant]}
    transformer = EasyAnimateMMDiT(MMDiTConfig.from_dict(config, family)).eval()
    randomize(transformer, seed=seed + 2)
    (folder / "transformer").mkdir()
    (folder / "transformer" / "config.json").write_text(json.dumps({"_class_name": "EasyAnimateTransformer3DModel", **config}))
    save_file({k: v.contiguous() for k, v in transformer.state_dict().items()},
              str(folder / "transformer" / "diffusion_pytorch_model.safetensors"))
    torch.manual_seed(seed + 3)
    vae = build_vae("v5", dict(TINY_VAE_V5))
    (folder / "vae").mkdir()
    vae_config = {"_class_name": "AutoencoderKLMagvit", **vae.config, "cache_mag_vae": True}
    (folder / "vae" / "config.json").write_text(json.dumps(vae_config))
    save_file({k: v.contiguous() for k, v in vae.model.state_dict().items()},
              str(folder / "vae" / "diffusion_pytorch_model.safetensors"))
    (folder / "scheduler").mkdir()
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler))
