"""MuLTI: a per-frame ViT, a BERT text encoder, the Text-Guided MultiWay-Sampler, and task heads.

    model = MuLTI(load_config("multi-tiny"))
    video = model.encode_video(frames)                  # (B, T, 1 + N, d), temporal embedding added
    text = model.encode_text(ids, mask)                 # (B, L, d)
    sim = model.video_embedding(video) @ model.text_embedding(text).T / model.temperature   # VTC
    fused = model.fuse(video, text, mask)               # Fused(video, text, text_mask, cls)
    model.vtm_logits(fused), model.mcm_logits(fused), model.qa_logits(fused), model.tag_logits(fused),
    model.mlm_logits(model.fuse(video, text, mask, condense_text=False))

Heads (all on the fused text-[CLS] slot `fused.cls`, as in ALPRO):
* VTM: Linear(d, 2), match / no match.          * MCM: Linear(d, 1), one score per (video, option) sequence.
* QA: MLP d -> 2d -> |answers| (GELU, LN).      * Tags: Linear(2d, |tags|) on [cls; mean of video slots].
* MLM: BERT's head (dense, GELU, LN) with the decoder tied to the BERT word embeddings.
VTC uses the encoders' own [CLS] features *before* fusion (cacheable for retrieval).

Video-only uses (tagging with no text, caching): `fuse` needs some text; pass a fixed prompt, e.g. the
tokenizer's "[CLS] [SEP]", with `guided=False` so the block pooling is plain adaptive average pooling.

Seeing motion when trained from scratch (config keys, our design; the defaults are the paper's layout):
`position_init="sincos"` (place and time as sine/cosine tables at token scale), `temporal_layers`
(a small transformer over the frame [CLS] tokens), `video_attention="joint"` (the ViT attends across
frames) and `frame_context` (each frame token reads its neighbouring frames). The shipped small model
uses the first, second and fourth: with frame_context 0, training on direction questions alone stayed
at chance (325 steps per-frame, 800 steps joint); with 2 it passed 95 % after 350 steps.

Encoders come from `transformers` (imported when a model is built, not when this module is imported):
`ViTModel` or `CLIPVisionModel` and `BertModel`. `init_vision_from` / `init_text_from` fill them from a
user's Hugging Face checkpoint folder (or file, or state dict) and report missing / unexpected keys.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import CheckpointMismatchError, EasyAnimateError, check_finite
from ..models.embeddings import sincos_1d
from .adapter import AttentionAdapter, freeze_and_attach
from .config import MuLTIConfig
from .sampler import Fused, build_fusion

logger = logging.getLogger(__name__)

TEMPERATURE_RANGE = (0.001, 0.5)


class MaskedLanguageHead(nn.Module):
    """BERT's MLM head: dense + GELU + LayerNorm, then the (tied) word embeddings plus a bias."""

    def __init__(self, dim: int, vocab_size: int, eps: float = 1e-12):
        super().__init__()
        self.dense = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.bias = nn.Parameter(torch.zeros(vocab_size))

    def forward(self, hidden: torch.Tensor, word_embeddings: torch.Tensor) -> torch.Tensor:
        return F.linear(self.norm(F.gelu(self.dense(hidden))), word_embeddings, self.bias)


@dataclass
class InitReport:
    """What `init_vision_from` / `init_text_from` loaded (model keys) and what did not match."""

    loaded: list = field(default_factory=list)
    missing: list = field(default_factory=list)  # model keys the checkpoint did not provide (left as initialised)
    unexpected: list = field(default_factory=list)  # checkpoint keys with no place in the model (ignored)

    def __str__(self) -> str:
        from ..checkpoint import describe_keys

        return (f"loaded {len(self.loaded)} tensors; missing {describe_keys(self.missing)}; "
                f"unexpected {describe_keys(self.unexpected)}")


def _build_vision(config: MuLTIConfig) -> nn.Module:
    vision = {**config.vision, "image_size": config.image_size, "num_channels": config.vision_channels}
    if config.vision_backbone == "clip":
        from transformers import CLIPVisionConfig, CLIPVisionModel

        return CLIPVisionModel(CLIPVisionConfig(**vision))
    from transformers import ViTConfig, ViTModel

    return ViTModel(ViTConfig(**vision), add_pooling_layer=False)


class MuLTI(nn.Module):
    def __init__(self, config: MuLTIConfig):
        super().__init__()
        from transformers import BertConfig, BertModel

        self.config = config
        d = config.hidden_size
        self.vision_encoder = _build_vision(config)
        self.text_encoder = BertModel(BertConfig(**config.text), add_pooling_layer=False)
        if config.gradient_checkpointing:
            self.vision_encoder.gradient_checkpointing_enable()
        self.temporal_embed = nn.Parameter(torch.randn(config.max_frames, d) * 0.02)
        self.temporal_encoder = None
        if config.temporal_layers:
            heads = int(config.vision.get("num_attention_heads", config.text.get("num_attention_heads", 12)))
            layer = nn.TransformerEncoderLayer(d, heads, 4 * d, dropout=0.0, activation="gelu", batch_first=True,
                                               norm_first=True)
            self.temporal_encoder = nn.TransformerEncoder(layer, config.temporal_layers, enable_nested_tensor=False)

        # VTC: unimodal [CLS] features -> embed_dim, L2-normalised; learnable temperature.
        self.video_proj = nn.Linear(d, config.embed_dim)
        self.text_proj = nn.Linear(d, config.embed_dim)
        self.temp = nn.Parameter(torch.tensor(float(config.temperature_init)))

        self.fusion = build_fusion(config.sampler, d)

        eps = float(config.text.get("layer_norm_eps", 1e-12))
        self.vtm_head = nn.Linear(d, 2)
        self.mcm_head = nn.Linear(d, 1)
        self.qa_head = (nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.LayerNorm(2 * d, eps=eps),
                                      nn.Linear(2 * d, len(config.answers))) if config.answers else None)
        self.tag_head = nn.Linear(2 * d, len(config.tags)) if config.tags else None
        self.mlm_head = MaskedLanguageHead(d, int(config.text.get("vocab_size", 30522)), eps)

        self.vision_adapter = self.text_adapter = None
        if config.adapter.enable:
            self._attach_adapters()
        if config.position_init == "sincos":
            self._init_positions_sincos()
        self._clip_frames = None  # frames per clip while encode_video runs (joint attention)
        if config.video_attention == "joint":
            first_layer = self._vision_parts()[1][0]
            first_layer.register_forward_pre_hook(self._join_frames, with_kwargs=True)

    def _join_frames(self, layer, args, kwargs):
        """Pre-hook of the first ViT layer (video_attention "joint"): the per-frame token rows
        (B·T, 1 + N, d) become one row per clip (B, T·(1 + N), d), with the temporal embedding added, so
        every layer attends across frames. The encoders' own code runs unchanged; the final LayerNorm is
        per token, so the output only needs to be viewed back."""
        frames = self._clip_frames
        if frames is None:  # the ViT called on its own, not through encode_video: frames stay apart
            return None
        hidden = args[0] if args else kwargs.pop("hidden_states")
        BT, P, d = hidden.shape
        hidden = (hidden.view(BT // frames, frames, P, d) + self.temporal_embedding(frames)[None, :, None]).flatten(1, 2)
        return (hidden, *args[1:]), kwargs

    def _init_positions_sincos(self) -> None:
        """config.position_init == "sincos": the ViT patch positions (y, x), the temporal embedding (t) and
        the sampler's video slots (t', y', x') start as sine/cosine tables; [CLS] rows start at zero."""
        d = self.config.hidden_size
        with torch.no_grad():
            if self.config.vision_backbone == "clip":
                table = self._clip_tower().embeddings.position_embedding.weight  # (1 + N, d)
            else:
                table = self.vision_encoder.embeddings.position_embeddings[0]  # (1 + N, d)
            table[0] = 0
            table[1:] = sincos_table(self.config.patch_grid, d)
            self.temporal_embed.copy_(sincos_table((self.config.max_frames,), d))
            slots = getattr(self.fusion, "slot_embed", None)
            if slots is not None:
                slots[0] = 0
                slots[1:] = sincos_table(self.config.sampler.grid, d)

    # ------------------------------------------------------------------------------------------------
    # Encoders
    # ------------------------------------------------------------------------------------------------
    def _clip_tower(self) -> nn.Module:
        # transformers 4.x wraps the CLIP vision tower in `.vision_model`; 5.x does not.
        return getattr(self.vision_encoder, "vision_model", self.vision_encoder)

    def _vision_parts(self) -> tuple[list[nn.Module], list[nn.Module]]:
        """(modules before the first layer, the list of layers) of the vision encoder."""
        if self.config.vision_backbone == "clip":
            tower = self._clip_tower()
            return [tower.embeddings, tower.pre_layrnorm], _layer_list(tower)
        return [self.vision_encoder.embeddings], _layer_list(self.vision_encoder)

    def _attach_adapters(self) -> None:
        cfg, d = self.config.adapter, self.config.hidden_size
        self.vision_adapter = AttentionAdapter(d, cfg)
        self.text_adapter = AttentionAdapter(d, cfg)
        stems, layers = self._vision_parts()
        frozen = layers[: cfg.n_frozen_vision]
        freeze_and_attach(self.vision_adapter, stems + frozen, frozen[-1] if frozen else stems[-1])
        text_layers = _layer_list(self.text_encoder)
        frozen = text_layers[: cfg.n_frozen_text]
        freeze_and_attach(self.text_adapter, [self.text_encoder.embeddings] + frozen,
                          frozen[-1] if frozen else self.text_encoder.embeddings)

    def temporal_embedding(self, frames: int) -> torch.Tensor:
        """(T, d): the first T rows; longer clips than `max_frames` stretch the table linearly."""
        table = self.temporal_embed
        if frames <= table.shape[0]:
            return table[:frames]
        return F.interpolate(table.T.unsqueeze(0), size=frames, mode="linear", align_corners=True)[0].T

    def encode_video(self, frames: torch.Tensor) -> torch.Tensor:
        """frames (B, T, 3, S, S), normalised (preprocess.prepare_frames) -> (B, T, 1 + N, d).

        The ViT sees each frame on its own; the temporal embedding is added to every token of frame t
        afterwards. Cross-frame mixing happens in the sampler (as in the paper) and, with `config.temporal_layers`,
        in a small transformer over the frame [CLS] tokens, which replace the [CLS] tokens of the output."""
        if not isinstance(frames, torch.Tensor) or frames.dim() != 5 or frames.shape[2] != 3:
            got = tuple(frames.shape) if isinstance(frames, torch.Tensor) else type(frames).__name__
            raise EasyAnimateError(
                f"MuLTI.encode_video takes normalised frames (B, T, 3, S, S) from prepare_frames; got {got}."
            )
        check_finite(frames, "MuLTI video frames")  # NaN frames would make every score NaN
        B, T = frames.shape[:2]
        k = self.config.frame_context
        if k:  # each frame with its k neighbours each side, stacked as channels (edges repeat)
            window = (torch.arange(T)[:, None] + torch.arange(-k, k + 1)).clamp(0, T - 1).to(frames.device)
            frames = frames[:, window].flatten(2, 3)  # (B, T, 3·(2k+1), S, S)
        pixels = frames.flatten(0, 1).to(self.temporal_embed.dtype)
        resized = pixels.shape[-1] != self.config.image_size
        if self.vision_adapter is not None and self.config.adapter.video_scope == "clip":
            self.vision_adapter.frames = T
        self._clip_frames = T
        try:
            hidden = self.vision_encoder(pixel_values=pixels, interpolate_pos_encoding=resized).last_hidden_state
        finally:
            self._clip_frames = None
            if self.vision_adapter is not None:
                self.vision_adapter.frames = None
        if self.config.vision_backbone == "clip":
            # CLIP's last_hidden_state is before its final LayerNorm (applied only to the pooled [CLS]);
            # normalise every token so both backbones hand the sampler LayerNorm-ed features, as BERT does.
            hidden = self._clip_tower().post_layernorm(hidden)
        hidden = hidden.reshape(B, T, -1, hidden.shape[-1]) + self.temporal_embedding(T)[None, :, None]
        if self.temporal_encoder is not None:
            frame_cls = self.temporal_encoder(hidden[:, :, 0])  # (B, T, d), mixed across time
            hidden = torch.cat([frame_cls.unsqueeze(2), hidden[:, :, 1:]], 2)
        return hidden

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """input_ids, attention_mask (B, L) -> (B, L, d)."""
        if self.text_adapter is not None:
            self.text_adapter.key_mask = attention_mask
        try:
            return self.text_encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        finally:
            if self.text_adapter is not None:
                self.text_adapter.key_mask = None

    # ------------------------------------------------------------------------------------------------
    # VTC (unimodal)
    # ------------------------------------------------------------------------------------------------
    def video_embedding(self, video_feats: torch.Tensor) -> torch.Tensor:
        """(B, T, 1 + N, d) -> (B, embed_dim), L2-normalised: projection of the mean frame [CLS]."""
        return F.normalize(self.video_proj(video_feats[:, :, 0].mean(1)), dim=-1)

    def text_embedding(self, text_feats: torch.Tensor) -> torch.Tensor:
        """(B, L, d) -> (B, embed_dim), L2-normalised: projection of the text [CLS]."""
        return F.normalize(self.text_proj(text_feats[:, 0]), dim=-1)

    @property
    def temperature(self) -> torch.Tensor:
        return self.temp.clamp(*TEMPERATURE_RANGE)

    # ------------------------------------------------------------------------------------------------
    # Fusion and heads
    # ------------------------------------------------------------------------------------------------
    def fuse(self, video_feats: torch.Tensor, text_feats: torch.Tensor, attention_mask: torch.Tensor,
             guided: bool = True, *, condense_text: bool = True) -> Fused:
        """The sampler (or flatten baseline) on encoder outputs. `guided=False`: uniform block pooling
        (no text guidance); `condense_text=False`: keep every text token (MLM)."""
        return self.fusion(video_feats, text_feats, attention_mask, guided=guided, condense_text=condense_text)

    def vtm_logits(self, fused: Fused) -> torch.Tensor:
        return self.vtm_head(fused.cls)  # (B, 2): [no match, match]

    def mcm_logits(self, fused: Fused) -> torch.Tensor:
        return self.mcm_head(fused.cls).squeeze(-1)  # (B,)

    def qa_logits(self, fused: Fused) -> torch.Tensor:
        if self.qa_head is None:
            raise ValueError("This MuLTI config has no answer vocabulary (config.answers is empty); no QA head.")
        return self.qa_head(fused.cls)

    def tag_logits(self, fused: Fused) -> torch.Tensor:
        if self.tag_head is None:
            raise ValueError("This MuLTI config has no tags (config.tags is empty); no tag head.")
        return self.tag_head(torch.cat([fused.cls, fused.video.mean(1)], -1))

    @property
    def word_embeddings(self) -> torch.Tensor:
        return self.text_encoder.embeddings.word_embeddings.weight

    def mlm_logits(self, fused: Fused) -> torch.Tensor:
        """(B, M_t, vocab). Fuse with condense_text=False so text slot i is token i."""
        return self.mlm_head(fused.text, self.word_embeddings)

    # ------------------------------------------------------------------------------------------------
    # Initialisation from public checkpoints
    # ------------------------------------------------------------------------------------------------
    def init_vision_from(self, source) -> InitReport:
        """Fill the vision encoder from a HF ViT / CLIP (vision or full) checkpoint: a folder holding
        model.safetensors (or shards, or a .bin read with weights_only), one weights file, or a state dict.
        Keys may carry a "vit." / "vision_model." / "model." prefix; CLIP text-tower keys are reported as
        unexpected. Report names are in the Hub layout (see `hub_layout`)."""
        state = _read_state_dict(source)
        if self.config.frame_context:
            state = _inflate_patch_embedding(state, self.config.frame_context)
        return _load_into(self.vision_encoder, state, "vision encoder", source)

    def init_text_from(self, source) -> InitReport:
        """Fill the text encoder (and the MLM head, from BERT's `cls.predictions.*`) from a HF BERT checkpoint."""
        state = _read_state_dict(source)
        report = _load_into(self.text_encoder, state, "text encoder", source, extra_prefixes=("bert.",))
        head_names = {"cls.predictions.transform.dense.": "dense.", "cls.predictions.transform.LayerNorm.": "norm.",
                      "cls.predictions.bias": "bias"}
        head = {}
        for key in list(report.unexpected):
            name = key.replace(".gamma", ".weight").replace(".beta", ".bias")
            for old, new in head_names.items():
                if name.startswith(old):
                    head[new + name[len(old):]] = state[key]
                    report.unexpected.remove(key)
        if head:
            head_report = _load_into(self.mlm_head, head, "MLM head", source)
            report.loaded += [f"mlm_head.{k}" for k in head_report.loaded]
        return report

    def init_sampler_from_text(self, which: str = "last") -> int:
        """Copy BERT layer weights into the sampler's attention and both FFNs of every layer (from BERT
        layers 1..K or the last K; both FFNs start from the same BERT FFN, as in VLMo). LayerNorms stay as
        they are (BERT is post-LN, the sampler pre-LN). Returns the number of layers copied."""
        bert = {hub: self.text_encoder.state_dict()[native] for native, hub in hub_layout(self.text_encoder).items()}
        count = int(self.config.text.get("num_hidden_layers", 12))
        layers = self.fusion.layers
        indices = range(count - len(layers), count) if which == "last" else range(len(layers))
        with torch.no_grad():
            for ours, i in zip(layers, indices):
                bert_layer = f"encoder.layer.{i}."
                pairs = [(ours.attention.query, "attention.self.query"), (ours.attention.key, "attention.self.key"),
                         (ours.attention.value, "attention.self.value"), (ours.attention.out, "attention.output.dense")]
                for ffn in (ours.ffn_video, ours.ffn_text):
                    pairs += [(ffn.fc1, "intermediate.dense"), (ffn.fc2, "output.dense")]
                for linear, name in pairs:
                    weight, bias = bert[bert_layer + name + ".weight"], bert[bert_layer + name + ".bias"]
                    if linear.weight.shape != weight.shape:
                        raise CheckpointMismatchError(
                            f"sampler layer {tuple(linear.weight.shape)} vs BERT {name} {tuple(weight.shape)}: "
                            "init_sampler_from_text needs ffn_mult * d == BERT intermediate_size.")
                    linear.weight.copy_(weight)
                    linear.bias.copy_(bias)
        return len(layers)

    def portable_names(self) -> dict[str, str]:
        """state_dict name -> the name MuLTI files use: the encoders' tensors in the Hugging Face Hub layout,
        so a file written with one transformers version loads with another (see `hub_layout`)."""
        names = {name: name for name in self.state_dict()}
        for prefix, encoder in (("vision_encoder.", self.vision_encoder), ("text_encoder.", self.text_encoder)):
            for native, hub in hub_layout(encoder).items():
                names[prefix + native] = prefix + hub
        return names


def sincos_table(sizes: tuple[int, ...], dim: int) -> torch.Tensor:
    """(prod(sizes), dim): the row-major grid of `sizes` (one axis: positions 0..n-1), each axis encoded
    by the DiT's `sincos_1d` (sines and cosines over geometric frequencies, MAE style) in its own
    share of the channels (even shares; the first axes take the remainder). Values lie in [-1, 1], about
    the per-channel scale of LayerNorm-ed tokens."""
    shares = [2 * (dim // (2 * len(sizes)))] * len(sizes)
    for i in range((dim - sum(shares)) // 2):
        shares[i % len(sizes)] += 2
    grids = torch.meshgrid(*(torch.arange(n, dtype=torch.float64) for n in sizes), indexing="ij")
    table = torch.cat([sincos_1d(share, grid) for grid, share in zip(grids, shares)], 1)
    if table.shape[1] < dim:  # an odd width: one spare channel
        table = torch.cat([table, table.new_zeros(table.shape[0], dim - table.shape[1])], 1)
    return table.float()


def _layer_list(module: nn.Module) -> list[nn.Module]:
    """The transformer layers of a transformers encoder (their attribute path differs by model and version)."""
    for path in ("layers", "encoder.layer", "encoder.layers"):
        try:
            found = module.get_submodule(path)
        except AttributeError:
            continue
        if isinstance(found, nn.ModuleList):
            return list(found)
    raise AttributeError(f"cannot find the layer list of {type(module).__name__}")


def hub_layout(encoder: nn.Module) -> dict[str, str]:
    """The installed transformers' tensor names of `encoder` -> their names in Hugging Face Hub checkpoints.

    transformers 5 renamed some models' internals (ViT: `encoder.layer.N.attention.attention.query` became
    `layers.N.attention.q_proj`; the CLIP vision model lost its `vision_model.` level) and converts Hub
    checkpoints while loading them; 4.x uses the Hub names as they are. We ask transformers' own reverse
    conversion for the mapping: each tensor is tagged with its index, so the renamed dict tells which
    name became which. CLIP names are given without the `vision_model.` prefix.
    """
    names = list(encoder.state_dict())
    mapping = {name: name for name in names}
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:  # transformers 4.x: the modules already use the Hub names
        revert_weight_conversion = None
    if revert_weight_conversion is not None:
        tagged = {name: torch.tensor([float(i)]) for i, name in enumerate(names)}
        try:
            reverted = revert_weight_conversion(encoder, tagged)
        except Exception:  # noqa: BLE001 - an unexpected conversion: keep the installed names
            reverted = None
        if reverted is not None and len(reverted) == len(names) and all(v.numel() == 1 for v in reverted.values()):
            mapping = {names[int(v.item())]: hub for hub, v in reverted.items()}
    return {native: hub.removeprefix("vision_model.") for native, hub in mapping.items()}


def _inflate_patch_embedding(state: dict, context: int) -> dict:
    """A single-frame checkpoint for a model whose patch embedding reads 2·context + 1 frames: the RGB
    weights go to the middle frame, zeros to the neighbours, so the model starts as the checkpoint's
    per-frame ViT (the I3D "centre" inflation)."""
    state = dict(state)
    for key, weight in state.items():
        if key.endswith(("patch_embeddings.projection.weight", "patch_embedding.weight")) and weight.ndim == 4 \
                and weight.shape[1] == 3:
            inflated = weight.new_zeros(weight.shape[0], 3 * (2 * context + 1), *weight.shape[2:])
            inflated[:, 3 * context: 3 * context + 3] = weight
            state[key] = inflated
    return state


def _read_state_dict(source) -> dict[str, torch.Tensor]:
    if isinstance(source, dict):
        return source
    from ..checkpoint import iter_file, weight_files

    path = Path(source)
    files = weight_files(path, stem="model") if path.is_dir() else [path]
    state = {}
    for file in files:
        state.update(iter_file(file))
    return state


def _load_into(module: nn.Module, state: dict, what: str, source, extra_prefixes=()) -> InitReport:
    """Copy the tensors of `state` whose names, after stripping the best-matching prefix, are `module`'s,
    in the Hub layout (`hub_layout`) or in the installed transformers' own layout. Reports Hub names."""
    native = module.state_dict()
    layout = hub_layout(module) if hasattr(module, "config") else {k: k for k in native}
    targets = {hub: native[name] for name, hub in layout.items()}
    canonical = {**{name: hub for name, hub in layout.items()}, **{hub: hub for hub in layout.values()}}
    prefixes = ("", "vit.", "model.", "module.", "vision_model.", *extra_prefixes)

    def strip(key: str, prefix: str) -> str | None:
        if not key.startswith(prefix):
            return None
        name = key[len(prefix):]
        if name not in canonical:  # TF-era BERT names
            name = name.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias")
        return canonical.get(name)

    prefix = max(prefixes, key=lambda p: sum(strip(k, p) is not None for k in state))
    report = InitReport()
    with torch.no_grad():
        for key, tensor in state.items():
            name = strip(key, prefix)
            if name is None:
                report.unexpected.append(key)
                continue
            if tuple(tensor.shape) != tuple(targets[name].shape):
                raise CheckpointMismatchError(
                    f"{what}: '{key}' in {source if not isinstance(source, dict) else 'the state dict'} has shape "
                    f"{tuple(tensor.shape)}, the model expects {tuple(targets[name].shape)}. Make the MuLTI config's "
                    "encoder section (and image_size) match this checkpoint's config.json.")
            targets[name].copy_(tensor)
            report.loaded.append(name)
    report.missing = sorted(set(targets) - set(report.loaded))
    report.unexpected.sort()
    if not report.loaded:
        raise CheckpointMismatchError(f"{what}: no tensor of {source!s:.200} matches this encoder ({report}).")
    logger.info("MuLTI %s from %s: %s", what, source if isinstance(source, (str, os.PathLike)) else "state dict", report)
    return report
