"""A complete tiny EasyAnimate release folder in the real layout, for end-to-end tests.

transformer/ (tiny V3 InP or V2), vae/ (tiny slice VAE), text_encoder/ + tokenizer/ (tiny T5 and a
sentencepiece model trained here), image_encoder/ (tiny CLIP vision tower, V3 only), scheduler/.
"""
import io
import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from tiny import full_state_dict, random_model, tiny_config_dict

TINY_VAE = {"ch": 8, "ch_mult": [1, 2, 4, 4], "norm_num_groups": 4, "use_tiling": False}
TINY_T5 = dict(d_model=24, d_kv=8, num_heads=3, d_ff=48, num_layers=2, feed_forward_proj="gated-gelu",
               relative_attention_num_buckets=32, relative_attention_max_distance=128, layer_norm_epsilon=1e-6,
               vocab_size=160, dropout_rate=0.0, tie_word_embeddings=False, decoder_start_token_id=0,
               pad_token_id=0, eos_token_id=1)
CORPUS = ["a red circle moving right on a black background", "a blue square moving up on a gray background",
          "fireworks over a city at night, high quality", "the video is not of a high quality, blurry, ugly"]
SCHEDULER = {
    "_class_name": "DPMSolverMultistepScheduler", "_diffusers_version": "0.22.0.dev0", "algorithm_type": "dpmsolver++",
    "beta_end": 0.02, "beta_schedule": "linear", "beta_start": 0.0001, "lower_order_final": True,
    "num_train_timesteps": 1000, "prediction_type": "epsilon", "solver_order": 2, "solver_type": "midpoint",
    "steps_offset": 0, "thresholding": False, "timestep_spacing": "linspace", "trained_betas": None,
    "use_karras_sigmas": False,
}
PREPROCESSOR = {
    "crop_size": {"height": 32, "width": 32}, "do_center_crop": True, "do_convert_rgb": True, "do_normalize": True,
    "do_rescale": True, "do_resize": True, "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_processor_type": "CLIPImageProcessor", "image_std": [0.26862954, 0.26130258, 0.27577711],
    "resample": 3, "rescale_factor": 1 / 255, "size": {"shortest_edge": 32},
}


def write_tokenizer(folder: Path) -> None:
    import sentencepiece

    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS * 10), model_writer=model, vocab_size=60, model_type="unigram",
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, pad_piece="<pad>", eos_piece="</s>", unk_piece="<unk>",
        character_coverage=1.0, num_threads=1, hard_vocab_limit=False, minloglevel=2,
    )
    folder.mkdir(parents=True)
    (folder / "spiece.model").write_bytes(model.getvalue())
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "T5Tokenizer", "extra_ids": 100}))


def write_text_encoder(folder: Path, seed: int = 0) -> None:
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    model = T5EncoderModel(T5Config(**TINY_T5))
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({**model.config.to_dict(), "architectures": ["T5EncoderModel"]}))
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "encoder.embed_tokens.weight"}
    save_file(state, str(folder / "model.safetensors"))


def write_image_encoder(folder: Path, seed: int = 0) -> None:
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(seed)
    config = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                              image_size=32, patch_size=8, projection_dim=768)
    model = CLIPVisionModelWithProjection(config)
    model.save_pretrained(str(folder), safe_serialization=True)
    (folder / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR))


def write_vae(folder: Path, family: str = "v3", seed: int = 0) -> None:
    from easyanimate.vae import build_vae

    torch.manual_seed(seed)
    config = TINY_VAE if family == "v3" else {**TINY_VAE, "ch_mult": [1, 2, 2, 4]}
    vae = build_vae(family, config)
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(vae.config))
    save_file({k: v.contiguous() for k, v in vae.model.state_dict().items()}, str(folder / "diffusion_pytorch_model.safetensors"))


def make_release(root: Path, family: str = "v3", seed: int = 0) -> Path:
    """Write a tiny release of `family` ("v3": InP with CLIP, or "v2") into `root`; returns `root`."""
    root.mkdir(parents=True, exist_ok=True)
    model = random_model(family, seed=seed, num_layers=2, caption_channels=TINY_T5["d_model"],
                         **({"in_channels": 12} if family == "v3" else {}))
    config = tiny_config_dict(family, num_layers=2, caption_channels=TINY_T5["d_model"])
    transformer = root / "transformer"
    transformer.mkdir()
    (transformer / "config.json").write_text(json.dumps(config))
    save_file(full_state_dict(model), str(transformer / "diffusion_pytorch_model.safetensors"))
    write_vae(root / "vae", family, seed)
    write_text_encoder(root / "text_encoder", seed)
    write_tokenizer(root / "tokenizer")
    if family == "v3":
        write_image_encoder(root / "image_encoder", seed)
    (root / "scheduler").mkdir()
    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps(SCHEDULER))
    (root / "model_index.json").write_text(json.dumps({"_class_name": "PixArtAlphaPipeline"}))
    return root


TINY_KL = {"block_out_channels": [8, 16, 32, 32], "norm_num_groups": 4}


def make_v1_release(root: Path, motion_module_file: Path, seed: int = 0) -> Path:
    """A tiny V1 layout: a PixArt-alpha folder (2-D transformer config and weights, SD VAE, T5) in `root`
    and the motion-module file (every `attn_temporal` tensor) at `motion_module_file`."""
    from easyanimate.models.transformer import family_preset
    from easyanimate.vae import build_vae

    root.mkdir(parents=True, exist_ok=True)
    # The motion-module settings of a V1 base come from the V1 preset, so the tiny model uses them too.
    motion = family_preset("v1")["motion_module_kwargs"]
    model = random_model("v1", seed=seed, num_layers=2, caption_channels=TINY_T5["d_model"], motion_module_kwargs=motion)
    state = full_state_dict(model)
    config = {k: v for k, v in tiny_config_dict("v1", num_layers=2, caption_channels=TINY_T5["d_model"]).items()
              if not k.startswith(("motion_module", "basic_block", "enable_uvit"))}
    config["_class_name"] = "Transformer2DModel"
    transformer = root / "transformer"
    transformer.mkdir()
    (transformer / "config.json").write_text(json.dumps(config))
    save_file({k: v for k, v in state.items() if ".attn_temporal." not in k},
              str(transformer / "diffusion_pytorch_model.safetensors"))
    motion_module_file.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v for k, v in state.items() if ".attn_temporal." in k}, str(motion_module_file))
    torch.manual_seed(seed)
    vae = build_vae("v1", TINY_KL)
    (root / "vae").mkdir()
    (root / "vae" / "config.json").write_text(json.dumps(vae.config))
    save_file({k: v.contiguous() for k, v in vae.model.state_dict().items()}, str(root / "vae" / "diffusion_pytorch_model.safetensors"))
    write_text_encoder(root / "text_encoder", seed)
    write_tokenizer(root / "tokenizer")
    (root / "scheduler").mkdir()
    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps(SCHEDULER))
    return root
