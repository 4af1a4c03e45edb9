"""Training the EasyAnimate V3 InP diffusion transformer with the reference's objective.

    python -m easyanimate train-dit --data DATA --vae VAE_RUN --text TEXT_RUN --out RUN --steps 5000

What one step does (the objective of IDDPM / PixArt that EasyAnimate's scripts use):
  1. x0 = VAE latents of a batch (posterior samples x scaling factor), cached once per data set;
  2. t ~ U{0..999}, noise ~ N(0, 1), x_t = sqrt(a_t) x0 + sqrt(1 - a_t) noise (linear betas 1e-4..0.02);
  3. the model sees x_t + the 8 inpaint channels [mask latents, masked-video latents] + the caption's
     T5 states (dropped to the empty prompt 10 % of the time, for classifier-free guidance) + zero CLIP
     tokens with a zero mask (the demo has no image encoder, as a text-to-video run sees it);
  4. loss = MSE(predicted eps, noise)                                  (the "simple" term)
          + KL(q(x_{t-1} | x_t, x0) || p(x_{t-1} | x_t))                (the variational bound, in bits,
                                                                          only training the variance:
                                                                          the mean uses a detached eps)
     with the variance "learned range": log var = f log beta_t + (1 - f) log beta~_t, f = (v + 1) / 2
     from the model's last 4 output channels; at t = 0 the bound is the discretised Gaussian NLL.
     Optionally (`mse_weight_cap`, off by default) the MSE of each sample is weighted by
     min(1 + 1/SNR_t, cap): the plain eps MSE hardly rewards a better prediction at the noisy steps, where
     colours and layout are decided (see `Diffusion.mse_weights`).
Batches alternate as in EasyAnimate: three of video clips, one of single images (1 latent frame).
Half of the video samples keep their first frame (mask 0 on frame 0, the frame in the masked video),
so the model does image-to-video with the same inputs `generate(start_images=...)` builds.

The result is a V3 release folder: transformer/ (EMA weights), vae/, text_encoder/, tokenizer/,
scheduler/, model_index.json. `easyanimate.pipeline.load_model` loads it like any release.
"""
from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from .common import (EMA, LossLog, Progress, count_parameters, load_checkpoint, save_checkpoint, save_weights,
                     start_run, subfolder_or_self, warmup_cosine)

# The V3 InP transformer, shrunk: every block keeps self-attention, the V3 global motion module
# (even blocks temporal+temporal, odd blocks temporal+global attention), cross-attention and the
# feed-forward; 12 input channels (4 noisy + 4 mask + 4 masked-video latents); 8 outputs (eps +
# learned variance); the CLIP projection. Patch 1 on the 8x8 latent grid of 64 px frames.
# U-ViT is off: its skips only connect blocks 0..12 to blocks 15.., so an 8-block model would carry
# 13 unused layers (docs/numerics.md#u-vit-long-skips).
DEMO_DIT_OVERRIDES = {
    "num_layers": 8,
    "num_attention_heads": 2,
    "attention_head_dim": 32,
    "cross_attention_dim": 64,
    "caption_channels": 64,
    "sample_size": 8,
    "patch_size": 1,
    "enable_uvit": False,
    "motion_module_kwargs_even": {"num_attention_heads": 4, "temporal_position_encoding_max_len": 64},
    "motion_module_kwargs_odd": {"num_attention_heads": 4, "temporal_position_encoding_max_len": 64},
}

# The released V3 scheduler/scheduler_config.json (a DPM-Solver config; docs/numerics.md#two-configuration-routes).
SCHEDULER_CONFIG = {
    "_class_name": "DPMSolverMultistepScheduler",
    "_diffusers_version": "0.22.0.dev0",
    "algorithm_type": "dpmsolver++",
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "beta_start": 0.0001,
    "dynamic_thresholding_ratio": 0.995,
    "euler_at_final": False,
    "lambda_min_clipped": -float("inf"),
    "lower_order_final": True,
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "sample_max_value": 1.0,
    "solver_order": 2,
    "solver_type": "midpoint",
    "steps_offset": 0,
    "thresholding": False,
    "timestep_spacing": "linspace",
    "trained_betas": None,
    "use_karras_sigmas": False,
    "use_lu_lambdas": False,
    "variance_type": None,
}


def demo_transformer_config(overrides: dict | None = None) -> dict:
    """The full V3 preset with the demo's sizes: a config.json any V3 loader reads."""
    from ..models.transformer import family_preset

    config = family_preset("v3")
    for key, value in {**DEMO_DIT_OVERRIDES, **(overrides or {})}.items():
        config[key] = dict(config[key], **value) if isinstance(value, dict) and isinstance(config.get(key), dict) else value
    return config


@dataclass
class DiTTrainConfig:
    data: str
    vae: str  # a folder with vae/ (or the vae/ folder)
    text: str  # a folder with text_encoder/ + tokenizer/
    out: str
    steps: int = 5000
    video_batch: int = 16
    image_batch: int = 32
    image_every: int = 4  # every 4th step is an image batch
    lr: float = 5e-4
    warmup: int = 200
    ema_decay: float = 0.999
    text_dropout: float = 0.1
    first_frame_prob: float = 0.5
    high_noise_fraction: float = 0.0  # share of samples with t drawn from the noisier half [500, 1000) only
    high_noise_from_step: int = 0  # ... from this step on
    mse_weight_cap: float = 0.0  # > 0: weight each sample's eps MSE by min(1 + 1/SNR_t, cap) (Diffusion.mse_weights)
    frames: int = 16
    seed: int = 0
    threads: int = 2
    save_every: int = 250
    print_every: int = 50
    stop_at: int | None = None  # end this run after that step (a time-boxed part of a longer run; resume later)
    init_from: str | None = None  # start from a release folder's transformer (fine-tuning)
    model: dict = field(default_factory=dict)  # overrides of DEMO_DIT_OVERRIDES


# ------------------------------------------------------------------------------------ the objective
class Diffusion:
    """The DDPM training process of EasyAnimate (1000 steps, linear betas) and its two loss terms."""

    def __init__(self, steps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02):
        betas = np.linspace(beta_start, beta_end, steps, dtype=np.float64)
        alphas_cumprod = np.cumprod(1 - betas)
        previous = np.append(1.0, alphas_cumprod[:-1])
        posterior_variance = betas * (1 - previous) / (1 - alphas_cumprod)
        as_tensor = lambda a: torch.tensor(a, dtype=torch.float32)
        self.steps = steps
        self.alphas_cumprod = as_tensor(alphas_cumprod)
        self.sqrt_alphas_cumprod = as_tensor(np.sqrt(alphas_cumprod))
        self.sqrt_one_minus_alphas_cumprod = as_tensor(np.sqrt(1 - alphas_cumprod))
        self.sqrt_recip_alphas_cumprod = as_tensor(np.sqrt(1 / alphas_cumprod))
        self.sqrt_recipm1_alphas_cumprod = as_tensor(np.sqrt(1 / alphas_cumprod - 1))
        # beta~_0 is 0, so its log is taken from beta~_1 (IDDPM's "clipped" log variance)
        self.posterior_log_variance = as_tensor(np.log(np.append(posterior_variance[1], posterior_variance[1:])))
        self.log_betas = as_tensor(np.log(betas))
        self.posterior_mean_coef1 = as_tensor(betas * np.sqrt(previous) / (1 - alphas_cumprod))
        self.posterior_mean_coef2 = as_tensor((1 - previous) * np.sqrt(1 - betas) / (1 - alphas_cumprod))

    @staticmethod
    def _at(table: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return table[t].view(-1, *([1] * (like.ndim - 1)))

    def add_noise(self, x0, noise, t):
        return self._at(self.sqrt_alphas_cumprod, t, x0) * x0 + self._at(self.sqrt_one_minus_alphas_cumprod, t, x0) * noise

    def mse_weights(self, t: torch.Tensor, cap: float) -> torch.Tensor:
        """Per-sample weights min(1 + 1/SNR_t, cap), scaled to mean 1 over the batch.

        The eps MSE of a sample equals SNR_t times its error in x0, so at the noisy end, where a video's
        colours and layout are decided, a better x0 prediction barely lowers the loss. 1 + 1/SNR is the
        weighting v-prediction implies; the cap keeps the noisiest steps (SNR ~ 1e-4) from drowning the rest.
        What it changed for the demo model is measured in easyanimate/demo/README.md."""
        snr = self.alphas_cumprod[t] / (1 - self.alphas_cumprod[t])
        weights = torch.clamp(1 + 1 / snr, max=cap)
        return weights / weights.mean()

    def losses(self, model_output: torch.Tensor, x0: torch.Tensor, x_t: torch.Tensor, noise: torch.Tensor,
               t: torch.Tensor, mse_weight_cap: float = 0.0) -> dict:
        """{"mse", "vb", "loss"}: per-sample means over every latent element, then the batch mean.
        `mse_weight_cap` > 0 weights the MSE term per sample (`mse_weights`); 0 is the reference's plain mean."""
        channels = x0.shape[1]
        eps, variance_values = model_output[:, :channels], model_output[:, channels:2 * channels]
        mse = (eps - noise).square().flatten(1).mean(1)
        if mse_weight_cap > 0:
            mse = mse * self.mse_weights(t, mse_weight_cap)

        # Variational bound with the mean frozen: only the variance learns from it (IDDPM hybrid loss).
        min_log = self._at(self.posterior_log_variance, t, x0)
        max_log = self._at(self.log_betas, t, x0)
        fraction = (variance_values + 1) / 2
        model_log_variance = fraction * max_log + (1 - fraction) * min_log
        pred_x0 = self._at(self.sqrt_recip_alphas_cumprod, t, x0) * x_t - self._at(self.sqrt_recipm1_alphas_cumprod, t, x0) * eps.detach()
        model_mean = self._at(self.posterior_mean_coef1, t, x0) * pred_x0 + self._at(self.posterior_mean_coef2, t, x0) * x_t
        true_mean = self._at(self.posterior_mean_coef1, t, x0) * x0 + self._at(self.posterior_mean_coef2, t, x0) * x_t
        kl = gaussian_kl(true_mean, min_log, model_mean, model_log_variance).flatten(1).mean(1) / math.log(2.0)
        nll = -discretized_gaussian_log_likelihood(x0, model_mean, 0.5 * model_log_variance).flatten(1).mean(1) / math.log(2.0)
        vb = torch.where(t == 0, nll, kl)
        return {"mse": mse.mean(), "vb": vb.mean(), "loss": (mse + vb).mean()}


def gaussian_kl(mean1, logvar1, mean2, logvar2):
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)), elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2).square() * torch.exp(-logvar2))


def _standard_normal_cdf(x):
    # the tanh approximation IDDPM uses (exact enough, and smooth)
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


def discretized_gaussian_log_likelihood(x, means, log_scales, bin_width: float = 2.0 / 255):
    """log P(x) for x in [-1, 1] quantised to 256 levels under N(means, e^(2 log_scales)), elementwise."""
    centred = x - means
    inv_std = torch.exp(-log_scales)
    cdf_plus = _standard_normal_cdf(inv_std * (centred + bin_width / 2))
    cdf_min = _standard_normal_cdf(inv_std * (centred - bin_width / 2))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_delta))


# ------------------------------------------------------------------------------------ initialisation
def init_transformer(model: nn.Module, seed: int) -> None:
    """DiT/PixArt-style initialisation: Xavier linears, zero biases, zero output layers (so every block and
    the motion modules start as identities and the prediction starts at 0), small modulation tables."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                fan_in = module.weight[0].numel()
                fan_out = module.weight.shape[0] * module.weight[0, 0].numel() if module.weight.ndim > 2 else module.weight.shape[0]
                bound = math.sqrt(6.0 / (fan_in + fan_out))
                module.weight.copy_(torch.rand(module.weight.shape, generator=gen) * 2 * bound - bound)
                if module.bias is not None:
                    module.bias.zero_()
        for name, param in model.named_parameters():
            if name.endswith("scale_shift_table"):
                param.copy_(torch.randn(param.shape, generator=gen) / param.shape[-1] ** 0.5)
            if name.startswith("proj_out.") or name.endswith("temporal_transformer.proj_out.weight"):
                param.zero_()
            if name.startswith("adaln_single.linear."):
                param.zero_()


def build_transformer(config: dict, seed: int):
    from ..models.transformer import EasyAnimateTransformer3D, TransformerConfig

    model = EasyAnimateTransformer3D(TransformerConfig.from_dict(config, "v3"))
    init_transformer(model, seed)
    return model


# ------------------------------------------------------------------------------------ cached inputs
class LatentCache:
    """Everything the transformer sees for a data set, computed once with the frozen VAE and T5:

    video_mean/std (N, 4, L, h, w), first_mean/std (masked video keeping only frame 0), image_mean/std
    (N, 4, 1, h, w) of one frame per clip, caption/image-caption ids into `text`/`text_mask` (row 0 =
    the empty prompt), and the inpaint latents that do not depend on the clip (masks, the all -1 video).
    Posteriors are stored as mean and std and sampled at every use, as the reference samples them.
    """

    def __init__(self, tensors: dict):
        self.__dict__.update(tensors)

    @property
    def count(self) -> int:
        return self.video_mean.shape[0]

    def save(self, path) -> None:
        torch.save(self.__dict__, path)

    @classmethod
    def load(cls, path) -> "LatentCache":
        return cls(torch.load(path, weights_only=True))


@torch.no_grad()
def build_cache(data_folder, vae_folder, text_folder, frames: int, seed: int, batch: int = 32) -> LatentCache:
    from ..text import load_text_encoder
    from ..vae import load_vae
    from .data import read_folder, to_model_pixels

    vae = load_vae(vae_folder, dtype="fp32")
    encoder = load_text_encoder(text_folder, dtype="fp32")
    data = read_folder(data_folder, frames=frames)
    rng = np.random.default_rng(seed)
    image_frames = rng.integers(0, frames, len(data))
    scale = vae.scaling_factor

    def posterior(pixels):
        p = vae.encode(pixels)
        return p.mean * scale, p.std * scale

    parts = {k: [] for k in ("video_mean", "video_std", "first_mean", "first_std", "image_mean", "image_std")}
    progress = Progress(len(data), "encode clips")
    for start in range(0, len(data), batch):
        pixels = to_model_pixels(data.clips[start:start + batch])
        for name, value in zip(("video_mean", "video_std"), posterior(pixels)):
            parts[name].append(value)
        first_only = torch.full_like(pixels, -1.0)
        first_only[:, :, 0] = pixels[:, :, 0]
        for name, value in zip(("first_mean", "first_std"), posterior(first_only)):
            parts[name].append(value)
        index = torch.arange(start, start + pixels.shape[0])
        images = pixels[torch.arange(pixels.shape[0]), :, torch.from_numpy(image_frames[index.numpy()])][:, :, None]
        for name, value in zip(("image_mean", "image_std"), posterior(images)):
            parts[name].append(value)
        progress.update(pixels.shape[0])
    progress.close()
    tensors = {k: torch.cat(v) for k, v in parts.items()}

    # Inputs shared by every sample: mask videos encoded as images in [0, 1] (1 = generate), and the
    # all -1 masked video of text-to-video, exactly as `pipeline.generate` builds them.
    h, w = data.clips.shape[2:4]
    def constant(value_fn, length):
        video = torch.ones(1, 3, length, h, w)
        value_fn(video)
        mean, std = posterior(video)
        return mean[0], std[0]

    tensors["mask_all"] = constant(lambda v: None, frames)
    tensors["mask_first_kept"] = constant(lambda v: v[:, :, 0].zero_(), frames)
    tensors["masked_none"] = constant(lambda v: v.fill_(-1.0), frames)
    tensors["image_mask_all"] = constant(lambda v: None, 1)
    tensors["image_masked_none"] = constant(lambda v: v.fill_(-1.0), 1)

    captions = sorted(set(data.captions) | set(data.image_captions))
    texts = [""] + captions
    embeds, masks = [], []
    for text in texts:
        encoded = encoder.encode([text])
        embeds.append(encoded.embeds[0])
        masks.append(encoded.mask[0])
    index = {t: i for i, t in enumerate(texts)}
    tensors["text"] = torch.stack(embeds).float()
    tensors["text_mask"] = torch.stack(masks)
    tensors["caption_ids"] = torch.tensor([index[c] for c in data.captions])
    tensors["image_caption_ids"] = torch.tensor([index[c] for c in data.image_captions])
    tensors["scaling_factor"] = scale
    return LatentCache(tensors)


def sample_posterior(mean, std, gen):
    """A draw from the diagonal Gaussian (mean, std), from `gen`."""
    return mean + std * torch.randn(mean.shape, generator=gen)


def make_batch(cache: LatentCache, cfg: DiTTrainConfig, step: int) -> dict:
    """The inputs of one step, a pure function of (seed, step): a resumed run sees the same batches."""
    gen = torch.Generator().manual_seed(cfg.seed * 7_919 + step)
    is_image_step = cfg.image_every > 0 and step % cfg.image_every == cfg.image_every - 1
    size = cfg.image_batch if is_image_step else cfg.video_batch
    ids = torch.randint(cache.count, (size,), generator=gen)
    if is_image_step:
        x0 = sample_posterior(cache.image_mean[ids], cache.image_std[ids], gen)
        mask = sample_posterior(*cache.image_mask_all, gen).expand(size, -1, -1, -1, -1)
        masked = sample_posterior(*cache.image_masked_none, gen).expand(size, -1, -1, -1, -1)
        text_ids = cache.image_caption_ids[ids]
    else:
        x0 = sample_posterior(cache.video_mean[ids], cache.video_std[ids], gen)
        keep_first = (torch.rand(size, generator=gen) < cfg.first_frame_prob).view(-1, 1, 1, 1, 1)
        mask = torch.where(keep_first, sample_posterior(*cache.mask_first_kept, gen),
                           sample_posterior(*cache.mask_all, gen))
        masked = torch.where(keep_first, sample_posterior(cache.first_mean[ids], cache.first_std[ids], gen),
                             sample_posterior(*cache.masked_none, gen))
        text_ids = cache.caption_ids[ids]
    dropped = torch.rand(size, generator=gen) < cfg.text_dropout
    text_ids = torch.where(dropped, torch.zeros_like(text_ids), text_ids)  # row 0 = the empty prompt
    return {
        "x0": x0,
        "inpaint": torch.cat([mask, masked], dim=1),
        "text": cache.text[text_ids],
        "text_mask": cache.text_mask[text_ids],
        "t": _timesteps(cfg, step, size, gen),
        "noise": torch.randn(x0.shape, generator=gen),
        "image_step": is_image_step,
    }


def _timesteps(cfg, step: int, size: int, gen) -> torch.Tensor:
    """t ~ U{0..999}; optionally a share of the batch from the noisier half only. The layout and colour of
    a sample are decided in the first, noisiest sampling steps, where a small model's conditional
    prediction is weakest (it sees those steps half as often as the rest of the range)."""
    t = torch.randint(0, 1000, (size,), generator=gen)
    share = getattr(cfg, "high_noise_fraction", 0.0)
    if share > 0 and step >= getattr(cfg, "high_noise_from_step", 0):
        high = torch.rand(size, generator=gen) < share
        t = torch.where(high, 500 + t // 2, t)
    return t


def training_loss(model, diffusion: Diffusion, batch: dict, mse_weight_cap: float = 0.0) -> dict:
    x_t = diffusion.add_noise(batch["x0"], batch["noise"], batch["t"])
    size = x_t.shape[0]
    output = model(x_t, batch["t"], batch["text"], batch["text_mask"], inpaint_latents=batch["inpaint"],
                   clip_encoder_hidden_states=torch.zeros(size, 768), clip_attention_mask=torch.zeros(size, 8))
    return diffusion.losses(output, batch["x0"], x_t, batch["noise"], batch["t"], mse_weight_cap)


# ------------------------------------------------------------------------------------ the loop
def cached_latents(run: Path, data, vae, text, frames: int, seed: int) -> "LatentCache":
    """The run's encoded training set: read from `<run>/latents.pt`, or built once and saved there."""
    cache_file = run / "latents.pt"
    if cache_file.is_file():
        return LatentCache.load(cache_file)
    cache = build_cache(data, vae, text, frames, seed)
    cache.save(cache_file)
    return cache


def train_dit(cfg: DiTTrainConfig) -> Path:
    """Train (or resume) and write the release folder `<out>/model`. Returns that folder."""
    run, _ = start_run(cfg)
    cache = cached_latents(run, cfg.data, subfolder_or_self(cfg.vae, "vae"), cfg.text, cfg.frames, cfg.seed)

    config = demo_transformer_config(cfg.model)
    config["caption_channels"] = int(cache.text.shape[-1])
    if cfg.init_from:
        from ..loading import load_transformer

        model = load_transformer(cfg.init_from, dtype="fp32")
        config = model.config.raw
    else:
        model = build_transformer(config, cfg.seed)
    model.train().requires_grad_(True)
    print(f"transformer: {count_parameters(model):,} parameters", flush=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0)
    ema = EMA(model, cfg.ema_decay)
    start, _ = load_checkpoint(run, model, optimizer, ema)
    if start:
        print(f"resuming transformer training at step {start}", flush=True)
    if not run_diffusion_training(model, optimizer, cache, cfg, run, start, "dit", ema=ema, clip_grad=1.0):
        return None
    return export_release(run / "model", ema.state_dict(), config, cfg.vae, cfg.text)


def ddpm_objective(cache: LatentCache, cfg):
    """The V3 objective as the training loop calls it: step -> ({"loss", "mse", "vb"}, batch kind)."""
    diffusion = Diffusion()

    def step_terms(model, step: int):
        batch = make_batch(cache, cfg, step)
        terms = training_loss(model, diffusion, batch, cfg.mse_weight_cap)
        return terms, "image" if batch["image_step"] else "video"

    return step_terms


def run_diffusion_training(model, optimizer, cache, cfg, run: Path, start: int, desc: str, *, ema=None,
                           clip_grad: float | None = None, objective=None) -> bool:
    """Steps `start`..`cfg.steps` of a diffusion objective on cached latents (shared by the DiT and LoRA
    trainers of both families): warm-up + cosine learning rate, optional gradient clipping and EMA, loss
    log, progress bar, checkpoints every `cfg.save_every` steps. `objective(model, step)` gives the step's
    loss terms (tensors, "loss" first) and its batch kind; None: the V3 objective (`ddpm_objective`).
    False when the run stopped early at `cfg.stop_at` (resume later)."""
    objective = objective or ddpm_objective(cache, cfg)
    log = LossLog(run, cfg.print_every, resume_step=start)
    progress = Progress(cfg.steps, desc, start=start)
    for step in range(start, cfg.steps):
        for group in optimizer.param_groups:
            group["lr"] = warmup_cosine(step, cfg.steps, cfg.lr, cfg.warmup)
        terms, kind = objective(model, step)
        optimizer.zero_grad(set_to_none=True)
        terms["loss"].backward()
        extra = {}
        if clip_grad is not None:
            extra["grad"] = torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad).item()
        optimizer.step()
        if ema is not None:
            ema.update(model, step)
        log.write(step + 1, **{name: value.item() for name, value in terms.items()}, kind=kind, **extra,
                  lr=optimizer.param_groups[0]["lr"])
        progress.update(loss=terms["loss"].item())
        if (step + 1) % cfg.save_every == 0 or step + 1 in (cfg.steps, cfg.stop_at):
            save_checkpoint(run, step + 1, model, optimizer, ema)
        if step + 1 == cfg.stop_at:
            progress.close()
            print(f"stopped at step {step + 1} of {cfg.steps}; run again to resume", flush=True)
            return False
    progress.close()
    return True


def export_release(folder, transformer_state: dict, transformer_config: dict, vae_source, text_source) -> Path:
    """Write a V3 release folder: transformer/ (fp16), vae/, text_encoder/, tokenizer/, scheduler/."""
    return write_release(folder, transformer_state, transformer_config, vae_source, text_source, SCHEDULER_CONFIG, {
        "_class_name": "EasyAnimateInpaintPipeline", "_comment": "EasyAnimate V3 InP layout, demo size",
        "transformer": ["easyanimate", "Transformer3DModel"], "vae": ["easyanimate", "AutoencoderKLMagvit"],
        "text_encoder": ["transformers", "T5EncoderModel"], "tokenizer": ["transformers", "T5Tokenizer"],
        "scheduler": ["diffusers", "DPMSolverMultistepScheduler"],
    })


def write_release(folder, transformer_state: dict, transformer_config: dict, vae_source, text_source,
                  scheduler_config: dict, model_index: dict) -> Path:
    """A release folder of any family: transformer/ (fp16), vae/ and text_encoder/ + tokenizer/ copied from
    their runs (unless already there), scheduler/scheduler_config.json and model_index.json."""
    folder = Path(folder)
    save_weights(folder / "transformer", transformer_state, transformer_config, dtype=torch.float16)
    for sub, source in (("vae", subfolder_or_self(vae_source, "vae")),
                        ("text_encoder", Path(text_source) / "text_encoder"),
                        ("tokenizer", Path(text_source) / "tokenizer")):
        if (folder / sub).resolve() != source.resolve():
            shutil.rmtree(folder / sub, ignore_errors=True)
            shutil.copytree(source, folder / sub)
    (folder / "scheduler").mkdir(parents=True, exist_ok=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler_config, indent=2) + "\n")
    (folder / "model_index.json").write_text(json.dumps(model_index, indent=2) + "\n")
    return folder


def export_checkpoint(run, vae_source, text_source, folder=None, weights: str = "ema") -> Path:
    """Write the release folder from a run's latest checkpoint (its "ema" or raw "model" weights), e.g. to
    try a run that is still training, or one stopped with `stop_at`."""
    run = Path(run)
    state = torch.load(run / "checkpoint.pt", map_location="cpu", weights_only=True)
    config = json.loads((run / "train_config.json").read_text())
    caption_channels = state[weights]["caption_projection.linear_1.weight"].shape[1]
    transformer_config = demo_transformer_config(dict(config.get("model") or {}, caption_channels=caption_channels))
    return export_release(Path(folder or run / "model"), state[weights], transformer_config, vae_source, text_source)
