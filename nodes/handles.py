"""The objects that travel along the pack's custom sockets.

Each is immutable from the graph's point of view: a node that changes something (a LoRA loader) returns
a new handle that shares the loaded weights, so branches of a workflow never affect each other.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Optional

from .host import Component

MODEL = "EASYANIMATE_MODEL"
VAE = "EASYANIMATE_VAE"
T5 = "EASYANIMATE_T5"
TEXT_EMBEDS = "EASYANIMATE_TEXT_EMBEDS"


@dataclass(frozen=True)
class ModelHandle:
    """EASYANIMATE_MODEL: the transformer (+ LoRAs), its family, and what sampling needs from its release."""

    name: str
    family: str
    transformer: Component
    scheduler_config: Optional[Path] = None
    image_encoder_dir: Optional[Path] = None  # V3 InP releases: CLIP for image-to-video
    image_encoder_cache: dict = field(default_factory=dict, compare=False, repr=False)
    companions: tuple = field(default=(), compare=False, repr=False)  # (VAEHandle, T5Handle) loaded with it

    def with_transformer(self, component: Component) -> "ModelHandle":
        return replace(self, transformer=component)

    def image_encoder(self, dtype):
        """The release's CLIP image encoder, loaded on first use and shared by every handle of this model."""
        if self.image_encoder_dir is None:
            return None
        if "encoder" not in self.image_encoder_cache:
            from ..easyanimate.image_encoder import load_image_encoder

            self.image_encoder_cache["encoder"] = load_image_encoder(self.image_encoder_dir, dtype=dtype)
        return self.image_encoder_cache["encoder"]


@dataclass(frozen=True)
class VAEHandle:
    """EASYANIMATE_VAE: a loaded VideoVAE and the host component that places its network."""

    vae: object
    component: Component
    preview_cache: dict = field(default_factory=dict, compare=False, repr=False)  # latent->RGB preview factors


class TextEncoderSource:
    """A T5 encoder that is loaded the first time a prompt is encoded, then shared."""

    def __init__(self, path: Path, dtype: str):
        self.path, self.dtype = Path(path), dtype
        self._lock = threading.Lock()
        self.encoder = None
        self.component = None
        self.last_lora_signature = ()

    def load(self):
        with self._lock:
            if self.encoder is None:
                from ..easyanimate.text import load_text_encoder

                self.encoder = load_text_encoder(self.path, dtype=self.dtype)
                self.component = Component.wrap(self.encoder.model, "text_encoder")
            return self.encoder


@dataclass(frozen=True)
class T5Handle:
    """EASYANIMATE_T5: a (lazily loaded) T5 encoder plus LoRAs to apply to it, as (file path, strength)."""

    source: TextEncoderSource
    loras: tuple = ()

    def with_lora(self, path: Path, strength: float) -> "T5Handle":
        return self if strength == 0 else replace(self, loras=self.loras + ((Path(path), float(strength)),))
