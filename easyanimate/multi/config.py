"""MuLTI configuration: one JSON file describes a whole model (docs/numerics.md#multi).

    config = load_config("easyanimate/multi/configs/multi-tiny.json")   # or a preset name: load_config("multi-tiny")
    config.sampler.grid, config.text["hidden_size"]
    config.to_dict() / MuLTIConfig.from_dict(d)

The encoders are described by plain `transformers` config dicts (`vision`: a ViTConfig or CLIPVisionConfig
dict, chosen by `vision_backbone`; `text`: a BertConfig dict), so a user's checkpoint folder's
`config.json` can be pasted in unchanged. Everything MuLTI adds (sampler, adapter, heads, losses) has its
own small section. Unknown keys are an error, so a typo in a JSON file is not silently ignored.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import EasyAnimateError

PRESET_DIR = Path(__file__).resolve().parent / "configs"

RESIDUAL_MODES = ("adapt_pool", "text_guided_pool", "attn_pool", "learned_query")
FUSIONS = ("sampler", "flatten")
VISION_BACKBONES = ("vit", "clip")
POSITION_INITS = ("normal", "sincos")
VIDEO_ATTENTIONS = ("frame", "joint")


@dataclass
class SamplerConfig:
    """The Text-Guided MultiWay-Sampler (v2, or its v1 variant) or the flatten baseline."""

    layers: int = 4  # K: layer 1 samples (cross-attends to the full sequences), layers 2..K fuse
    heads: int = 12
    ffn_mult: int = 4  # per-modality FFN width = ffn_mult * d
    # Target block grid (T', h', w'). T' = min(T, grid[0]), so M_v = T'*h'*w' stops growing at T = grid[0].
    grid: tuple[int, int, int] = (16, 4, 4)
    # "text_guided_pool" (v2), "adapt_pool" (v2 without guidance), "attn_pool" (v1: learned pooling queries
    # attend over the video), "learned_query" (free queries, the "previous sampler" baseline).
    residual_mode: str = "text_guided_pool"
    guide_dim: int = 256  # d_g of the importance scores
    guide_temperature: float = 1.0  # tau_g
    text_keep_max: int = 64  # longer text is condensed to this many tokens ([CLS] + pooled blocks)
    resample_every_layer: bool = False  # layers 2..K also attend to the full sequences (Perceiver style)
    fusion: str = "sampler"  # "flatten": K MultiWay layers over all video + text tokens (ablation A1)
    dropout: float = 0.0
    layer_norm_eps: float = 1e-6

    def __post_init__(self):
        self.grid = tuple(int(g) for g in self.grid)
        if len(self.grid) != 3 or min(self.grid) < 1:
            raise EasyAnimateError(f"sampler.grid must be three positive sizes (T', h', w'), got {self.grid}.")
        if self.residual_mode not in RESIDUAL_MODES:
            raise EasyAnimateError(f"sampler.residual_mode must be one of {RESIDUAL_MODES}, got '{self.residual_mode}'.")
        if self.fusion not in FUSIONS:
            raise EasyAnimateError(f"sampler.fusion must be one of {FUSIONS}, got '{self.fusion}'.")
        if self.layers < 1:
            raise EasyAnimateError("sampler.layers must be at least 1 (layer 1 is the sampling layer).")
        if self.text_keep_max < 2:
            raise EasyAnimateError("sampler.text_keep_max must be at least 2 ([CLS] + one pooled token).")


@dataclass
class AdapterConfig:
    """v1 attention-based adapter on the shallow encoder features (docs/numerics.md#adapter); off by default."""

    enable: bool = False
    n_frozen_vision: int = 6  # embeddings + this many ViT layers are frozen; the adapter sits after them
    n_frozen_text: int = 6
    attention_dim: int = 256  # reduced width of the adapter's self-attention
    heads: int = 4
    mlp_ratio: float = 0.25  # bottleneck MLP d -> ratio*d -> d
    video_scope: str = "frame"  # "frame": attend within a frame; "clip": over all frames (cheap temporal mixing)

    def __post_init__(self):
        if self.video_scope not in ("frame", "clip"):
            raise EasyAnimateError(f"adapter.video_scope must be 'frame' or 'clip', got '{self.video_scope}'.")


@dataclass
class MuLTIConfig:
    vision: dict = field(default_factory=dict)  # transformers ViTConfig / CLIPVisionConfig fields
    text: dict = field(default_factory=dict)  # transformers BertConfig fields
    vision_backbone: str = "vit"  # "vit" (ViTModel) or "clip" (CLIPVisionModel)
    num_frames: int = 8  # frames sampled per clip by preprocess.prepare_frames
    max_frames: int = 64  # rows of the temporal embedding; longer clips interpolate it
    image_size: int = 224  # frames are resized + cropped to this square
    image_mean: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
    image_std: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
    max_text_len: int = 40
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    embed_dim: int = 256  # VTC projection width
    temperature_init: float = 0.07
    loss_weights: dict = field(default_factory=lambda: {"vtc": 1.0, "vtm": 1.0, "mlm": 1.0, "mcm": 1.0})
    mlm_prob: float = 0.15
    mask_token_id: int = 103  # [MASK] of the tokenizer this model is trained with
    special_token_ids: tuple[int, ...] = (0, 100, 101, 102, 103)  # never masked or drawn as random MLM tokens
    tags: list = field(default_factory=list)  # multi-label tag names (tag head width)
    answers: list = field(default_factory=list)  # open-ended QA answer vocabulary (QA head width)
    gradient_checkpointing: bool = False  # per ViT block; worth it for T >= 16 when training
    # Where a model trained from scratch learns place and time from (our design, not the paper's):
    # "normal": the encoders' own init and std-0.02 temporal/slot tables (the paper starts from CLIP, whose
    # position embeddings are already trained); "sincos": fixed-frequency sine/cosine tables at the scale of
    # the tokens for the ViT patches (y, x), the temporal embedding (t) and the sampler's slots (t', y', x'),
    # so where and when a token is stays visible next to post-LayerNorm features from the first step.
    position_init: str = "normal"
    # Transformer layers over the frame [CLS] tokens across time, after the temporal embedding (0: none,
    # the paper's layout, where all cross-frame mixing happens in the sampler). The VTC video embedding
    # and the sampler's video [CLS] are means over frames, so without them neither sees frame order.
    temporal_layers: int = 0
    # "frame": the ViT attends within each frame (the paper); "joint": its layers attend over the tokens of
    # all frames of a clip at once (ViViT's joint space-time attention; the temporal embedding is added to
    # the ViT's input too), so motion can be read where the pixels are. Cost grows with T^2.
    video_attention: str = "frame"
    # Neighbouring frames each ViT frame token sees (our design): 0 = the frame alone (the paper); k > 0 =
    # the sampled frames t-k..t+k are stacked as channels (edges repeat the first/last frame) and the patch
    # embedding reads them all, so each patch token carries local motion, as a 3D-convolution stem does.
    # Its weights are 3·(2k+1) input channels; a 3-channel (CLIP/ViT) checkpoint fills the middle frame's.
    frame_context: int = 0

    def __post_init__(self):
        if isinstance(self.sampler, dict):
            self.sampler = SamplerConfig(**_known(SamplerConfig, self.sampler, "sampler"))
        if isinstance(self.adapter, dict):
            self.adapter = AdapterConfig(**_known(AdapterConfig, self.adapter, "adapter"))
        self.image_mean = tuple(float(x) for x in self.image_mean)
        self.image_std = tuple(float(x) for x in self.image_std)
        self.special_token_ids = tuple(int(x) for x in self.special_token_ids)
        self.tags, self.answers = list(self.tags), list(self.answers)
        if self.position_init not in POSITION_INITS:
            raise EasyAnimateError(f"position_init must be one of {POSITION_INITS}, got '{self.position_init}'.")
        if self.video_attention not in VIDEO_ATTENTIONS:
            raise EasyAnimateError(f"video_attention must be one of {VIDEO_ATTENTIONS}, got '{self.video_attention}'.")
        if self.frame_context < 0:
            raise EasyAnimateError(f"frame_context must be 0 or more, got {self.frame_context}.")
        if self.temporal_layers < 0:
            raise EasyAnimateError(f"temporal_layers must be 0 or more, got {self.temporal_layers}.")
        if self.vision_backbone not in VISION_BACKBONES:
            raise EasyAnimateError(f"vision_backbone must be one of {VISION_BACKBONES}, got '{self.vision_backbone}'.")
        d_vision, d_text = self.vision.get("hidden_size"), self.text.get("hidden_size")
        if d_vision is not None and d_text is not None and d_vision != d_text:
            raise EasyAnimateError(
                f"vision hidden_size {d_vision} != text hidden_size {d_text}: the sampler's shared attention "
                "needs one width for both modalities (pair ViT-B with BERT-base, ViT-L with BERT-large)."
            )

    # --- derived sizes ----------------------------------------------------------------------------
    @property
    def hidden_size(self) -> int:
        return int(self.text.get("hidden_size", 768))

    @property
    def patch_size(self) -> int:
        return int(self.vision.get("patch_size", 16))

    @property
    def vision_channels(self) -> int:
        """Input channels of the patch embedding: RGB of the frame and of its `frame_context` neighbours each side."""
        return 3 * (2 * self.frame_context + 1)

    @property
    def patch_grid(self) -> tuple[int, int]:
        """Patches per frame side (h, w) at `image_size`."""
        side = self.image_size // self.patch_size
        return side, side

    # --- JSON -------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        # tuples -> lists, so the dict is exactly what json.loads gives back
        return json.loads(json.dumps(out))

    @classmethod
    def from_dict(cls, data: dict) -> "MuLTIConfig":
        return cls(**_known(cls, dict(data), "MuLTI config"))

    def save(self, path: str | os.PathLike) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")


def _known(cls, data: dict, what: str) -> dict:
    names = {f.name for f in dataclasses.fields(cls)}
    data = {k: v for k, v in data.items() if not k.startswith("_")}  # "_comment" keys are allowed
    unknown = sorted(set(data) - names)
    if unknown:
        raise EasyAnimateError(f"{what}: unknown keys {unknown}; known keys are {sorted(names)}.")
    return data


def load_config(path_or_name: str | os.PathLike) -> MuLTIConfig:
    """A config from a JSON file, a model folder holding `config.json`, or a preset name ("multi-tiny")."""
    path = Path(path_or_name)
    if path.is_dir():
        path = path / "config.json"
    elif not path.exists() and (PRESET_DIR / f"{path_or_name}.json").is_file():
        path = PRESET_DIR / f"{path_or_name}.json"
    if not path.is_file():
        presets = sorted(p.stem for p in PRESET_DIR.glob("*.json"))
        raise EasyAnimateError(f"No MuLTI config at '{path_or_name}' (a JSON file, a model folder, or one of {presets}).")
    from ..checkpoint import read_json_config

    return MuLTIConfig.from_dict(read_json_config(path, what="MuLTI config"))
