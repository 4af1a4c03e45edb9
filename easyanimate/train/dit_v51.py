"""Training the EasyAnimate V5.1 InP transformer (the MMDiT) with the V5.1 objective, flow matching.

    python -m easyanimate train-dit --family v51 --data DATA --vae VAE_RUN --text TEXT_RUN --out RUN --steps 8000

What one step does (the V5.1 reference's `--loss_type flow --uniform_sampling`):
  1. x0 = VAE latents of a batch (posterior samples x scaling factor), cached once per data set;
  2. u ~ U(0, 1), t = 1000 - floor(1000 u) (an entry of the scheduler's table 1000, 999, ..., 1),
     sigma = t / 1000, noise ~ N(0, 1), x_t = (1 - sigma) x0 + sigma noise;
  3. the model sees x_t at timestep t with the 17 inpaint channels [mask 1 | masked-video latents 16] and
     the caption's Qwen2-VL states (the empty prompt `text_dropout` of the time, for classifier-free guidance);
  4. loss = MSE(model output, noise - x0): the velocity the Flow sampler integrates from sigma 1 to 0.
`sigma_shift` s != 1 (off in the reference) maps every sigma to s sigma / (1 + (s - 1) sigma) before use:
more of the samples at the noisy end, where a video's layout and colours are decided (`flow_timesteps`).

The inpaint channels are those `generate` builds (easyanimate/stages_v5.py), so the trained model does
text-to-video and image-to-video with the pipeline's own inputs:
  * text-to-video (and every image): zeros; the V5.1 pipelines pass zeros when everything is generated;
  * image-to-video (`first_frame_prob` of the clips): mask channel = (1 - m) resized to the latent grid
    x scaling factor, m = 0 on frame 0 (kept); masked video = frame 0, the other frames -1, with noise of
    std exp(N(-3, 0.5)) on its known pixels (the reference's training noise; the pipeline adds 0.0563),
    encoded to its posterior mode. A share `end_frame_prob` of those keep the last frame too (start and
    end images). The noise is drawn once per clip when the latents are cached.
Batches alternate as for V3: three of video clips, one of single images (1 latent frame).

The result is a V5.1 release folder: transformer/ (EMA weights, fp16), vae/, text_encoder/, tokenizer/,
scheduler/ (the flow-matching Euler config), model_index.json; `easyanimate.pipeline.load_model` loads it.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from .common import EMA, Progress, count_parameters, load_checkpoint, start_run, subfolder_or_self
from .dit import LatentCache, run_diffusion_training, sample_posterior, write_release

# The V5.1 InP transformer, shrunk: every block an MMDiT block (the 12B layout: its own text-stream
# weights), 2 heads of the released width 64, 2x2 patches as released (4 x 4 tokens per latent frame of
# a 64 px video), a 128-wide timestep embedding. The other keys keep the released V5.1 values.
DEMO_MMDIT_OVERRIDES = {
    "num_layers": 8,
    "mmdit_layers": 8,
    "num_attention_heads": 2,
    "attention_head_dim": 64,
    "patch_size": 2,
    "time_embed_dim": 128,
    "in_channels": 33,
    "out_channels": 16,
    "sample_width": 8,
    "sample_height": 8,
}
TRAIN_TIMESTEPS = 1000
INPAINT_NOISE_LOG_MEAN, INPAINT_NOISE_LOG_STD = -3.0, 0.5  # the reference's training noise on known pixels


def demo_mmdit_config(text_embed_dim: int, overrides: dict | None = None) -> dict:
    """The released V5.1 config with the demo's sizes: a transformer/config.json any V5.1 loader reads."""
    from ..models.mmdit import family_preset

    config = family_preset("v51")
    config.update(DEMO_MMDIT_OVERRIDES)
    config.update(overrides or {})
    config["text_embed_dim"] = int(text_embed_dim)
    return config


@dataclass
class FlowDiTTrainConfig:
    data: str
    vae: str  # a folder with vae/ (or the vae/ folder)
    text: str  # a folder with text_encoder/ + tokenizer/ (Qwen2-VL)
    out: str
    steps: int = 8000
    video_batch: int = 16
    image_batch: int = 32
    image_every: int = 4  # every 4th step is an image batch
    lr: float = 5e-4
    warmup: int = 200
    ema_decay: float = 0.999
    text_dropout: float = 0.1
    first_frame_prob: float = 0.5
    end_frame_prob: float = 0.25  # share of the image-to-video samples that keep the last frame too
    sigma_shift: float = 1.0  # > 1: more samples at the noisy end (1: the reference's uniform sigma)
    frames: int = 17
    seed: int = 0
    threads: int = 2
    save_every: int = 250
    print_every: int = 50
    stop_at: int | None = None  # end this run after that step (a time-boxed part of a longer run; resume later)
    init_from: str | None = None  # start from a V5.1 release folder's transformer (fine-tuning)
    model: dict = field(default_factory=dict)  # overrides of DEMO_MMDIT_OVERRIDES


# ------------------------------------------------------------------------------------ the objective
def flow_timesteps(size: int, gen: torch.Generator, shift: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(sigma, t) for `size` samples: t uniform over the scheduler's training table 1000, 999, ..., 1 and
    sigma = t / 1000, as the reference samples them; `shift` != 1 then moves every sigma towards 1 with the
    flow schedulers' shift s sigma / (1 + (s - 1) sigma), and t = 1000 sigma.

    Why shift: under uniform sigma, a sample lands in the noisy range where a video's layout is decided
    (signal-to-noise below 0.1, sigma above ~0.77) 23 % of the time; the V3 demo learnt the direction of
    motion only once about 75 % of its samples came from that range (easyanimate/demo/README.md). A shift
    of 3 puts 47 % there, 5 puts 59 %."""
    u = torch.rand(size, generator=gen)
    t = TRAIN_TIMESTEPS - torch.floor(u * TRAIN_TIMESTEPS)
    sigma = t / TRAIN_TIMESTEPS
    if shift != 1.0:
        sigma = shift * sigma / (1 + (shift - 1) * sigma)
        t = sigma * TRAIN_TIMESTEPS
    return sigma, t


def flow_loss(model, batch: dict) -> dict:
    """{"loss"}: the mean square error of the predicted velocity against noise - x0."""
    x0, noise = batch["x0"], batch["noise"]
    sigma = batch["sigma"].view(-1, *([1] * (x0.ndim - 1)))
    x_t = (1 - sigma) * x0 + sigma * noise
    velocity = model(x_t, batch["t"], batch["text"], inpaint_latents=batch["inpaint"])
    return {"loss": (velocity.float() - (noise - x0)).square().mean()}


def flow_objective(cache: LatentCache, cfg):
    """The training loop's objective (`dit.run_diffusion_training`): step -> ({"loss"}, batch kind)."""

    def step_terms(model, step: int):
        batch = make_flow_batch(cache, cfg, step)
        return flow_loss(model, batch), "image" if batch["image_step"] else "video"

    return step_terms


# ------------------------------------------------------------------------------------ initialisation
def init_mmdit(model: nn.Module, seed: int) -> None:
    """DiT-style initialisation (adaLN-zero): Xavier linears and patch projection, zero biases, unit norms;
    zero modulation layers (each block starts as the identity: its gates are 0) and a zero output layer
    (the prediction starts at 0)."""
    from ..models.mmdit import RMSNorm

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                fan_out, fan_in = module.weight.shape[0], module.weight[0].numel()
                receptive = module.weight[0, 0].numel() if module.weight.ndim > 2 else 1
                bound = math.sqrt(6.0 / (fan_in + fan_out * receptive))
                module.weight.copy_(torch.rand(module.weight.shape, generator=gen) * 2 * bound - bound)
                if module.bias is not None:
                    module.bias.zero_()
            elif isinstance(module, (nn.LayerNorm, RMSNorm)):
                module.weight.fill_(1.0)
                if getattr(module, "bias", None) is not None:
                    module.bias.zero_()
        for name, module in model.named_modules():
            if name == "proj_out" or name.endswith(("norm1.linear", "norm2.linear", "norm_out.linear")):
                module.weight.zero_()
                module.bias.zero_()


def build_mmdit(config: dict, seed: int):
    from ..models.mmdit import EasyAnimateMMDiT, MMDiTConfig

    model = EasyAnimateMMDiT(MMDiTConfig.from_dict(config, "v51"))
    init_mmdit(model, seed)
    return model


# ------------------------------------------------------------------------------------ cached inputs
def _known_frames(pixels: torch.Tensor, keep_last: bool, gen: torch.Generator) -> torch.Tensor:
    """The masked video of image-to-video for a batch of clips (B, 3, F, H, W) in [-1, 1]: frame 0 (and the
    last frame) kept, the others -1, and on the kept pixels that are not -1 noise of one std per clip
    drawn from exp(N(-3, 0.5)) (stages_v5 adds its fixed 0.0563 the same way)."""
    masked = torch.full_like(pixels, -1.0)
    masked[:, :, 0] = pixels[:, :, 0]
    if keep_last:
        masked[:, :, -1] = pixels[:, :, -1]
    std = torch.exp(INPAINT_NOISE_LOG_MEAN + INPAINT_NOISE_LOG_STD * torch.randn(pixels.shape[0], generator=gen))
    noise = torch.randn(pixels.shape, generator=gen) * std.view(-1, 1, 1, 1, 1)
    return masked + torch.where(masked == -1, torch.zeros_like(noise), noise)


def mask_latents(frames: int, height: int, width: int, keep_last: bool, latent_shape, scale: float) -> torch.Tensor:
    """The 1-channel mask latents (1, 1, L, h, w) of a video whose frame 0 (and last frame) is kept,
    computed as the pipeline computes them (stages_v5.resize_to_latents of 1 - mask, x scaling factor)."""
    from ..stages_v5 import resize_to_latents

    kept = torch.zeros(1, 1, frames, height, width)
    kept[:, :, 0] = 1
    if keep_last:
        kept[:, :, -1] = 1
    return resize_to_latents(kept, *latent_shape) * scale


@torch.no_grad()
def build_flow_cache(data_folder, vae_folder, text_folder, frames: int, seed: int, batch: int = 16) -> LatentCache:
    """Everything the transformer sees for a data set, computed once with the frozen VAE and Qwen2-VL:
    video_mean/std (N, 16, L, h, w) and image_mean/std (N, 16, 1, h, w) of one frame per clip (scaled
    posteriors, sampled at every use), first_masked / ends_masked (the image-to-video masked-video
    latents, posterior modes), the two mask-latent constants, and caption ids into `text` (row 0 = the
    empty prompt)."""
    from ..text_v5 import load_text_encoder_v5
    from ..vae import load_vae
    from .data import read_folder, to_model_pixels

    vae = load_vae(vae_folder, dtype="fp32")
    if not vae.rules.streaming:
        raise ValueError(f"'{vae_folder}' holds a {vae.family} VAE; a V5.1 transformer trains on the V5 VAE's latents")
    vae.rules.check_frames(frames)
    encoder = load_text_encoder_v5(text_folder, dtype="fp32")
    data = read_folder(data_folder, frames=frames)
    rng = np.random.default_rng(seed)
    image_frames = torch.from_numpy(rng.integers(0, frames, len(data)))
    noise_gen = torch.Generator().manual_seed(seed)
    scale = vae.scaling_factor

    parts = {k: [] for k in ("video_mean", "video_std", "image_mean", "image_std", "first_masked", "ends_masked")}
    progress = Progress(len(data), "encode clips")
    for start in range(0, len(data), batch):
        pixels = to_model_pixels(data.clips[start:start + batch])
        posterior = vae.encode(pixels)
        parts["video_mean"].append(posterior.mean * scale)
        parts["video_std"].append(posterior.std * scale)
        images = pixels[torch.arange(pixels.shape[0]), :, image_frames[start:start + pixels.shape[0]]][:, :, None]
        posterior = vae.encode(images)
        parts["image_mean"].append(posterior.mean * scale)
        parts["image_std"].append(posterior.std * scale)
        for name, keep_last in (("first_masked", False), ("ends_masked", True)):
            parts[name].append(vae.encode_latents(_known_frames(pixels, keep_last, noise_gen), sample=False))
        progress.update(pixels.shape[0])
    progress.close()
    tensors = {k: torch.cat(v) for k, v in parts.items()}

    latent_shape = tensors["video_mean"].shape[2:]
    height, width = data.clips.shape[2:4]
    tensors["mask_first"] = mask_latents(frames, height, width, False, latent_shape, scale)
    tensors["mask_ends"] = mask_latents(frames, height, width, True, latent_shape, scale)

    texts = [""] + sorted(set(data.captions) | set(data.image_captions))
    embeds, _ = encoder.encode_prompts(texts)
    index = {t: i for i, t in enumerate(texts)}
    tensors["text"] = embeds.float()
    tensors["caption_ids"] = torch.tensor([index[c] for c in data.captions])
    tensors["image_caption_ids"] = torch.tensor([index[c] for c in data.image_captions])
    tensors["scaling_factor"] = scale
    return LatentCache(tensors)


def cached_flow_latents(run: Path, data, vae, text, frames: int, seed: int) -> LatentCache:
    """The run's encoded training set: read from `<run>/latents.pt`, or built once and saved there."""
    cache_file = run / "latents.pt"
    if cache_file.is_file():
        return LatentCache.load(cache_file)
    cache = build_flow_cache(data, vae, text, frames, seed)
    cache.save(cache_file)
    return cache


def make_flow_batch(cache: LatentCache, cfg, step: int) -> dict:
    """The inputs of one step, a pure function of (seed, step): a resumed run sees the same batches."""
    gen = torch.Generator().manual_seed(cfg.seed * 7_919 + step)
    is_image_step = cfg.image_every > 0 and step % cfg.image_every == cfg.image_every - 1
    size = cfg.image_batch if is_image_step else cfg.video_batch
    ids = torch.randint(cache.count, (size,), generator=gen)
    if is_image_step:
        x0 = sample_posterior(cache.image_mean[ids], cache.image_std[ids], gen)
        inpaint = x0.new_zeros(size, 1 + x0.shape[1], *x0.shape[2:])
        text_ids = cache.image_caption_ids[ids]
    else:
        x0 = sample_posterior(cache.video_mean[ids], cache.video_std[ids], gen)
        keep_first = (torch.rand(size, generator=gen) < cfg.first_frame_prob).view(-1, 1, 1, 1, 1)
        keep_ends = keep_first & (torch.rand(size, generator=gen) < cfg.end_frame_prob).view(-1, 1, 1, 1, 1)
        zero = x0.new_zeros(())
        mask = torch.where(keep_ends, cache.mask_ends, torch.where(keep_first, cache.mask_first, zero))
        masked = torch.where(keep_ends, cache.ends_masked[ids], torch.where(keep_first, cache.first_masked[ids], zero))
        inpaint = torch.cat([mask.expand(size, -1, -1, -1, -1), masked], dim=1)
        text_ids = cache.caption_ids[ids]
    dropped = torch.rand(size, generator=gen) < cfg.text_dropout
    text_ids = torch.where(dropped, torch.zeros_like(text_ids), text_ids)  # row 0 = the empty prompt
    sigma, t = flow_timesteps(size, gen, cfg.sigma_shift)
    return {
        "ids": ids,
        "x0": x0,
        "inpaint": inpaint,
        "text": cache.text[text_ids],
        "sigma": sigma,
        "t": t,
        "noise": torch.randn(x0.shape, generator=gen),
        "image_step": is_image_step,
    }


# ------------------------------------------------------------------------------------ the loop
def train_dit_v51(cfg: FlowDiTTrainConfig) -> Path | None:
    """Train (or resume) and write the V5.1 release folder `<out>/model`. Returns that folder (None when
    the run stopped at `stop_at`)."""
    run, _ = start_run(cfg)
    cache = cached_flow_latents(run, cfg.data, subfolder_or_self(cfg.vae, "vae"), cfg.text, cfg.frames, cfg.seed)
    if cfg.init_from:
        from ..loading import load_transformer

        model = load_transformer(cfg.init_from, dtype="fp32")
        config = dict(model.config.raw)
    else:
        config = demo_mmdit_config(cache.text.shape[-1], cfg.model)
        model = build_mmdit(config, cfg.seed)
    model.train().requires_grad_(True)
    print(f"transformer: {count_parameters(model):,} parameters", flush=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0)
    ema = EMA(model, cfg.ema_decay)
    start, _ = load_checkpoint(run, model, optimizer, ema)
    if start:
        print(f"resuming transformer training at step {start}", flush=True)
    finished = run_diffusion_training(model, optimizer, cache, cfg, run, start, "dit v5.1", ema=ema, clip_grad=1.0,
                                      objective=flow_objective(cache, cfg))
    if not finished:
        return None
    return export_v51_release(run / "model", ema.state_dict(), config, cfg.vae, cfg.text)


def flow_scheduler_config(shift: float = 1.0) -> dict:
    """scheduler/scheduler_config.json of a V5.1 release: FlowMatchEulerDiscreteScheduler with the class
    defaults (configs/scheduler_classes.json) and `shift`."""
    from ..samplers.base import sampler_classes

    flow = sampler_classes()["Flow"]
    return {"_class_name": flow["diffusers_class"], **flow["defaults"], "shift": float(shift)}


def export_v51_release(folder, transformer_state: dict, transformer_config: dict, vae_source, text_source) -> Path:
    """Write a V5.1 release folder: transformer/ (fp16), vae/, text_encoder/, tokenizer/, scheduler/."""
    config = {"_class_name": "EasyAnimateTransformer3DModel", **transformer_config}
    return write_release(folder, transformer_state, config, vae_source, text_source, flow_scheduler_config(), {
        "_class_name": "EasyAnimateInpaintPipeline", "_comment": "EasyAnimate V5.1 InP layout, demo size",
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "text_encoder": ["transformers", "Qwen2VLForConditionalGeneration"],
        "tokenizer": ["transformers", "Qwen2Tokenizer"],
        "transformer": ["easyanimate", "EasyAnimateTransformer3DModel"],
        "vae": ["easyanimate", "AutoencoderKLMagvit"],
    })


def export_v51_checkpoint(run, vae_source, text_source, folder=None, weights: str = "ema") -> Path:
    """Write the release folder from a run's latest checkpoint (its "ema" or raw "model" weights), e.g. to
    try a run that is still training, or one stopped with `stop_at`."""
    run = Path(run)
    state = torch.load(run / "checkpoint.pt", map_location="cpu", weights_only=True)
    recorded = json.loads((run / "train_config.json").read_text())
    text_width = state[weights]["text_proj.1.weight"].shape[1]
    config = demo_mmdit_config(text_width, recorded.get("model") or {})
    return export_v51_release(Path(folder or run / "model"), state[weights], config, vae_source, text_source)
