"""Training the demo VAEs: reconstruction + KL, on clips and single frames.

Two families (`family`): "v3", the V3 slice VAE (`MagvitVAE`), and "v51", the causal MagViT VAE that V5 and
V5.1 share (`MagvitV5VAE`, 16 latent channels, 1 + 4k frames). The networks are the pack's own, built by
`easyanimate.vae.build_vae`, so the saved `vae/` folder has the released key names and loads with `load_vae`.
Training walks each clip the way inference does. V3: 8-frame slices encoded independently (2 latents
each), and every 2-latent slice decoded with its neighbours as context (V3 feature sharing), taken from the
same `FrameRule` plans the inference driver uses; single frames go through the lone-frame path (what
images and first frames use). V5.1: the whole clip as one causal stream (equal to the inference driver's
frame 0 + 4-frame chunks: the streaming cache makes chunking exact), a single frame as a 1-frame stream.

    python -m easyanimate train-vae --data DATA --out RUN --steps 1200
    python -m easyanimate train-vae --family v51 --data DATA17 --out RUN --steps 2000   # 17-frame clips

Loss = L1 + MSE (pixels in [-1, 1], pixels off the frame's median colour weighted `object_weight` times
more) + kl_weight * KL(posterior || N(0, 1)) (mean over latent elements), optionally + temporal_weight *
the latents' frame-to-frame change (`temporal_change`), optionally + preview_weight * the error of a linear
preview of each latent frame against its frames' pooled colours (`preview_error`), which makes the latent
frames show where the object is at their time (what these terms did on the demo data: easyanimate/demo/README.md).
At the end the latents of a sample of the data set give the `scaling_factor` (1 / std) that makes them
roughly unit variance for the diffusion model, written into the config like the released 0.18215.

`temporal_weight` and `preview_weight` are V3 terms (they are about its 8-frame slices); a V5.1 run refuses them.

`decoder_only` (with `init_from`) trains the decoder alone, on L1 + MSE: the encoder, its latents and the
scaling factor stay bit for bit, so a transformer trained on those latents still fits. The demo VAE got its
sharper shapes that way (a decoder trained longer than the encoder; easyanimate/demo/README.md).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .common import (LossLog, Progress, load_checkpoint, save_checkpoint, save_weights, start_run, subfolder_or_self,
                     warmup_cosine)
from .data import read_folder, to_model_pixels

# A small V3 VAE: same block types and key structure as the release, widths 8..64 instead of 128..512.
DEMO_VAE_CONFIG = {
    "_class_name": "AutoencoderKLMagvit",
    "in_channels": 3,
    "out_channels": 3,
    "ch": 8,
    "ch_mult": [1, 2, 4, 8],
    "down_block_types": ["SpatialDownBlock3D", "SpatialTemporalDownBlock3D", "SpatialTemporalDownBlock3D",
                         "SpatialTemporalDownBlock3D"],
    "up_block_types": ["SpatialUpBlock3D", "SpatialTemporalUpBlock3D", "SpatialTemporalUpBlock3D",
                       "SpatialTemporalUpBlock3D"],
    "layers_per_block": 1,
    "latent_channels": 4,
    "norm_num_groups": 4,
    "mid_block_use_attention": True,
    "mid_block_attention_type": "3d",
    "mid_block_num_attention_heads": 1,
    "scaling_factor": 1.0,  # replaced by the measured value when training ends
    "slice_compression_vae": True,
    "mini_batch_encoder": 8,
    "mini_batch_decoder": 2,
    "use_tiling": False,
    "tile_sample_min_size": 384,
    "tile_overlap_factor": 0.25,
}

# The V5.1 demo VAE: the released V5/V5.1 vae/config.json with every switch as released (cache_mag_vae,
# per-frame GroupNorm, no mid-block attention, 16 latent channels, chunks of 4 frames / 1 latent), widths
# 8..64 instead of 128..512 and one residual block per level (two in the decoder). 64 px frames give an
# 8 x 8 latent grid, 17 frames 5 latent frames.
DEMO_V51_VAE_CONFIG = {
    "_class_name": "AutoencoderKLMagvit",
    "in_channels": 3,
    "out_channels": 3,
    "block_out_channels": [8, 16, 32, 64],
    "down_block_types": ["SpatialDownBlock3D", "SpatialTemporalDownBlock3D", "SpatialTemporalDownBlock3D",
                         "SpatialTemporalDownBlock3D"],
    "up_block_types": ["SpatialUpBlock3D", "SpatialTemporalUpBlock3D", "SpatialTemporalUpBlock3D",
                       "SpatialTemporalUpBlock3D"],
    "layers_per_block": 1,
    "latent_channels": 16,
    "norm_num_groups": 4,
    "act_fn": "silu",
    "mid_block_use_attention": False,
    "mid_block_attention_type": "spatial",
    "spatial_group_norm": True,
    "scaling_factor": 1.0,  # replaced by the measured value when training ends
    "force_upcast": True,
    "sample_size": 64,
    "slice_mag_vae": False,
    "slice_compression_vae": False,
    "cache_compression_vae": False,
    "cache_mag_vae": True,
    "mini_batch_encoder": 4,
    "mini_batch_decoder": 1,
    "use_tiling": False,
    "use_tiling_encoder": False,
    "use_tiling_decoder": False,
}

# Per training family: the VAE family `easyanimate.vae` builds, the demo config, the clip length.
VAE_FAMILIES = {"v3": "v3", "v51": "v5"}
DEMO_VAE_CONFIGS = {"v3": DEMO_VAE_CONFIG, "v51": DEMO_V51_VAE_CONFIG}
DEFAULT_FRAMES = {"v3": 16, "v51": 17}


@dataclass
class VAETrainConfig:
    data: str
    out: str
    family: str = "v3"  # "v3" (slice VAE) or "v51" (the V5/V5.1 causal VAE)
    steps: int = 1200
    clips_per_batch: int = 4
    images_per_batch: int = 8
    frames: int | None = None  # None: the family's demo clip length (DEFAULT_FRAMES)
    lr: float = 1e-3
    warmup: int = 50
    kl_weight: float = 1e-4
    object_weight: float = 9.0  # extra weight of pixels that differ from their frame's median colour (0: none)
    temporal_weight: float = 0.0  # weight of `temporal_change` (0: the plain reconstruction + KL objective)
    preview_weight: float = 0.0  # weight of `preview_error` (0: off)
    init_from: str | None = None  # start from this VAE (a vae/ folder or a run holding one): fine-tuning
    decoder_only: bool = False  # with init_from: train the decoder alone; the latents (and scaling_factor) stay as they were
    seed: int = 0
    threads: int = 2
    save_every: int = 200
    print_every: int = 50
    stop_at: int | None = None  # end this run after that step (a time-boxed part of a longer run; resume later)
    model: dict | None = None  # the whole VAE config; None: the family's demo config (DEMO_VAE_CONFIGS)

    def model_config(self) -> dict:
        return dict(self.model if self.model is not None else DEMO_VAE_CONFIGS[self.family])

    def clip_frames(self) -> int:
        return self.frames or DEFAULT_FRAMES[self.family]


# ------------------------------------------------------------------------------ differentiable driving
def encode_moments(vae, pixels: torch.Tensor) -> torch.Tensor:
    """(B, 3, F, H, W) in [-1, 1] -> moments (B, 2*latent, F_lat, h, w), with gradients: V3 slice by slice,
    V5 as one causal stream."""
    if vae.rules.streaming:
        from ..models.vae_magvit5 import StreamCache

        return vae.model.encode_chunk(pixels, StreamCache())
    parts = [vae.model.encode_chunk(pixels[:, :, c.start:c.stop], c.mode) for c in vae.rules.encode_plan(pixels.shape[2])]
    return torch.cat(parts, dim=2)


def decode_latents(vae, z: torch.Tensor) -> torch.Tensor:
    """Unscaled latents -> pixels, with gradients: V3 every slice seeing its neighbours as at inference, V5 as
    one causal stream."""
    if vae.rules.streaming:
        from ..models.vae_magvit5 import StreamCache

        return vae.model.decode_chunk(z, StreamCache())
    parts = []
    for c in vae.rules.decode_plan(z.shape[2]):
        window = z[:, :, c.context_start:c.context_stop]
        parts.append(vae.model.decode_chunk(window, c.mode, c.start - c.context_start, c.context_stop - c.stop))
    return torch.cat(parts, dim=2)


def foreground_weights(pixels: torch.Tensor, object_weight: float) -> torch.Tensor:
    """1 + object_weight where a pixel differs from its frame's median colour (B, 1, F, H, W).

    Small objects on plain backgrounds cover a few percent of the pixels; without this weight the VAE
    first learns to paint the background alone and stays there for a long time."""
    if object_weight <= 0:
        return torch.ones_like(pixels[:, :1])
    background = pixels.flatten(3).median(dim=3).values[..., None, None]
    foreground = (pixels - background).abs().amax(dim=1, keepdim=True) > 0.1
    return 1 + object_weight * foreground.float()


def temporal_change(latent_mean: torch.Tensor) -> torch.Tensor:
    """Mean square step between consecutive latent frames over the latents' variance (scale-free).

    Left alone, the slice VAE keeps an object in place across the 2 latents of an 8-frame slice, codes the
    motion inside the slice in its channels and jumps the object at the slice border (measured by
    `evaluate.latent_motion_profile`). Penalising the squared steps favours equal steps (for a fixed path
    they have the smallest sum of squares) and counts the step across a slice border like any other. On its
    own it mostly stills the latents instead (measured on the demo data: the step at the slice border fell
    from 1.37 to 0.50 cells while the steps inside the slices did not grow); `preview_error` gives them a target."""
    if latent_mean.shape[2] < 2:
        return latent_mean.new_zeros(())
    return latent_mean.diff(dim=2).square().mean() / (latent_mean.var() + 1e-6)


def preview_target(pixels: torch.Tensor, latent_shape) -> torch.Tensor:
    """What latent frame k should show: the mean of the pixel frames it stands for (8-frame slice -> 2
    latents: 4 frames each; a lone frame -> itself), average-pooled to the latent grid. (B, 3, F_lat, h, w)."""
    b, c, f, h, w = pixels.shape
    f_lat, h_lat, w_lat = latent_shape[2:]
    if f % f_lat:
        raise ValueError(f"{f} frames do not split evenly into {f_lat} latent frames")
    frames = pixels.reshape(b, c, f_lat, f // f_lat, h, w).mean(3)
    return F.adaptive_avg_pool3d(frames, (f_lat, h_lat, w_lat))


def preview_error(latent_mean: torch.Tensor, pixels: torch.Tensor, head: torch.nn.Linear, object_weight: float) -> torch.Tensor:
    """Weighted MSE between `head` (latent channels -> RGB, trained with the VAE, not saved with it) applied
    to each latent cell and `preview_target`. The weights are the pooled `foreground_weights`, so the cells
    the object covers dominate.

    A preview of each latent frame that has to match its own frames pins the object to where it is at that
    time, which `temporal_change` alone does not. (Hosts preview released models' latents the same way,
    with a fixed linear latent -> RGB map.)"""
    target = preview_target(pixels, latent_mean.shape)
    preview = torch.einsum("bcfhw,rc->brfhw", latent_mean, head.weight) + head.bias[None, :, None, None, None]
    weight = F.adaptive_avg_pool3d(foreground_weights(pixels, object_weight), latent_mean.shape[2:])
    weight = weight / weight.mean()
    return (weight * (preview - target).square()).mean()


def vae_loss(vae, pixels: torch.Tensor, kl_weight: float, object_weight: float = 0.0,
             temporal_weight: float = 0.0, preview_head: torch.nn.Linear | None = None,
             preview_weight: float = 0.0, decoder_only: bool = False) -> tuple[torch.Tensor, dict]:
    from ..models.vae_magvit import DiagonalGaussian

    with torch.set_grad_enabled(torch.is_grad_enabled() and not decoder_only):
        posterior = DiagonalGaussian(encode_moments(vae, pixels))
    z = posterior.mean + posterior.std * torch.randn_like(posterior.mean)
    recon = decode_latents(vae, z)
    weight = foreground_weights(pixels, object_weight)
    weight = weight / weight.mean()
    l1 = (weight * (recon - pixels).abs()).mean()
    mse = (weight * (recon - pixels).square()).mean()
    kl = 0.5 * (posterior.mean.square() + posterior.logvar.exp() - 1 - posterior.logvar).mean()
    terms = {"l1": l1.item(), "mse": mse.item(), "kl": kl.item()}
    if decoder_only:  # a frozen encoder: the latent terms have nothing to train
        return l1 + mse, terms
    loss = l1 + mse + kl_weight * kl
    if temporal_weight > 0:
        change = temporal_change(posterior.mean)
        loss = loss + temporal_weight * change
        terms["temporal"] = change.item()
    if preview_weight > 0:
        error = preview_error(posterior.mean, pixels, preview_head, object_weight)
        loss = loss + preview_weight * error
        terms["preview"] = error.item()
    return loss, terms


def build_trainable_vae(model_config: dict, family: str = "v3"):
    from ..vae import build_vae

    vae = build_vae(VAE_FAMILIES[family], model_config)
    vae.model.train().requires_grad_(True)
    return vae


# ------------------------------------------------------------------------------ the loop
def check_vae_config(cfg: VAETrainConfig) -> None:
    """Refuse settings that do not fit together, before a run folder is made."""
    if cfg.family not in VAE_FAMILIES:
        raise ValueError(f"Unknown VAE training family '{cfg.family}'; use one of {', '.join(VAE_FAMILIES)}.")
    if cfg.family == "v51":
        if cfg.temporal_weight or cfg.preview_weight:
            raise ValueError("temporal_weight and preview_weight are terms for the V3 slice VAE's 8-frame slices; "
                             "a v51 run takes neither: set them to 0")
        if (cfg.clip_frames() - 1) % 4:
            raise ValueError(f"The V5.1 VAE takes 1 + 4k frames (e.g. 13 or 17); got frames={cfg.clip_frames()}")


def train_vae(cfg: VAETrainConfig) -> Path:
    """Train (or resume) and write `<out>/vae/` (config.json + safetensors). Returns that folder."""
    check_vae_config(cfg)
    if cfg.decoder_only and not cfg.init_from:
        raise ValueError("decoder_only fine-tunes an existing VAE's decoder: give init_from (a vae/ folder or a train-vae run)")
    if cfg.decoder_only and (cfg.temporal_weight or cfg.preview_weight):
        raise ValueError("temporal_weight and preview_weight shape the latents, which decoder_only keeps frozen: set them to 0")
    source_folder = subfolder_or_self(cfg.init_from, "vae") if cfg.init_from else None
    source = None
    if source_folder:
        from ..vae import load_vae

        source = load_vae(source_folder, dtype="fp32")
        if source.family != VAE_FAMILIES[cfg.family]:
            raise ValueError(f"init_from holds a {source.family} VAE; a {cfg.family} run trains a "
                             f"{VAE_FAMILIES[cfg.family]} one (see --family)")
    if cfg.decoder_only:  # the source's own config, scaling factor included: its latents stay as they are
        cfg = replace(cfg, model=json.loads((source_folder / "config.json").read_text()))
    run, _ = start_run(cfg)
    frames = cfg.clip_frames()
    data = read_folder(cfg.data, frames=frames)
    count = len(data)
    model_config = cfg.model_config()

    vae = build_trainable_vae(model_config, cfg.family)
    model = vae.model
    if source is not None:
        model.load_state_dict(source.model.state_dict())
    if cfg.decoder_only:
        model.encoder.requires_grad_(False)
        model.quant_conv.requires_grad_(False)
    # The preview head only exists during training; the checkpoint keeps it next to the VAE.
    preview_head = torch.nn.Linear(model_config["latent_channels"], 3)
    parameters = [p for p in model.parameters() if p.requires_grad]
    parameters += list(preview_head.parameters()) if cfg.preview_weight > 0 else []
    optimizer = torch.optim.AdamW(parameters, lr=cfg.lr, weight_decay=0.0)
    start, extra = load_checkpoint(run, model, optimizer)
    if "preview_head" in extra:
        preview_head.load_state_dict(extra["preview_head"])
    if start:
        print(f"resuming VAE training at step {start}", flush=True)
    log = LossLog(run, cfg.print_every, resume_step=start)
    progress = Progress(cfg.steps, "vae", start=start)
    model.train()
    for step in range(start, cfg.steps):
        for group in optimizer.param_groups:
            group["lr"] = warmup_cosine(step, cfg.steps, cfg.lr, cfg.warmup)
        # Batches are a function of (seed, step), so a resumed run sees the same data as an unbroken one.
        pick = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
        clip_ids = torch.randint(count, (cfg.clips_per_batch,), generator=pick).numpy()
        image_ids = torch.randint(count, (cfg.images_per_batch,), generator=pick).numpy()
        frame_ids = torch.randint(frames, (cfg.images_per_batch,), generator=pick).numpy()
        clips = to_model_pixels(data.clips[np.sort(clip_ids)])
        images = to_model_pixels(data.clips[image_ids, frame_ids][:, None])

        video_loss, video_terms = vae_loss(vae, clips, cfg.kl_weight, cfg.object_weight, cfg.temporal_weight,
                                           preview_head, cfg.preview_weight, cfg.decoder_only)
        image_loss, image_terms = vae_loss(vae, images, cfg.kl_weight, cfg.object_weight, 0.0, preview_head,
                                           cfg.preview_weight, cfg.decoder_only)
        loss = video_loss + 0.5 * image_loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()

        log.write(step + 1, loss=loss.item(), video_l1=video_terms["l1"], image_l1=image_terms["l1"],
                  kl=video_terms["kl"], **{k: video_terms[k] for k in ("temporal", "preview") if k in video_terms},
                  lr=optimizer.param_groups[0]["lr"])
        progress.update(loss=loss.item())
        if (step + 1) % cfg.save_every == 0 or step + 1 in (cfg.steps, cfg.stop_at):
            save_checkpoint(run, step + 1, model, optimizer, extra={"preview_head": preview_head.state_dict()})
        if step + 1 == cfg.stop_at:
            progress.close()
            print(f"stopped at step {step + 1} of {cfg.steps}; run again to resume", flush=True)
            return None
    progress.close()
    return export_vae(vae, data, run, model_config, measure_scale=not cfg.decoder_only)


@torch.no_grad()
def export_vae(vae, data, run: Path, model_config: dict, sample: int = 64, measure_scale: bool = True) -> Path:
    """Measure the latent scale on a sample of clips and write the release-style `vae/` folder.
    `measure_scale=False` keeps `model_config`'s scaling_factor (a decoder-only fine-tune: the latents did not change)."""
    vae.model.eval()
    config = dict(model_config)
    if measure_scale:
        pick = np.linspace(0, len(data) - 1, min(sample, len(data))).astype(int)
        std = encode_moments(vae, to_model_pixels(data.clips[pick])).chunk(2, dim=1)[0].std().item()
        config["scaling_factor"] = round(1.0 / std, 5)
        print(f"latent std {std:.4f} -> scaling_factor {config['scaling_factor']}", flush=True)
    folder = save_weights(run / "vae", vae.model.state_dict(), config, dtype=torch.float16)
    print(f"scaling_factor {config['scaling_factor']}; wrote {folder}", flush=True)
    return folder
