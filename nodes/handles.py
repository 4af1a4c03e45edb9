"""The objects that travel along the pack's custom sockets.

Each is immutable from the graph's point of view: a node that changes something (a LoRA loader) returns
a new handle that shares the loaded weights, so branches of a workflow never affect each other. Models
are held as host `Component`s (see `easyanimate.host`), which the host places for each stage.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Optional

from ..easyanimate.host import Component
from .host import current_host

MODEL = "EASYANIMATE_MODEL"
VAE = "EASYANIMATE_VAE"
T5 = "EASYANIMATE_T5"
TEXT_EMBEDS = "EASYANIMATE_TEXT_EMBEDS"


class LazyComponent:
    """A model loaded the first time it is needed, then shared by every handle that holds this object."""

    def __init__(self, load, kind: str):
        self._load, self.kind = load, kind
        self._lock = threading.Lock()
        self.model = None
        self.component: Optional[Component] = None

    def get(self):
        """(the loaded model object, its Component)."""
        with self._lock:
            if self.model is None:
                self.model = self._load()
                self.component = current_host().wrap(self.model.model, self.kind)
            return self.model, self.component


@dataclass(frozen=True)
class ModelHandle:
    """EASYANIMATE_MODEL: the transformer (+ LoRAs), its family, and what sampling needs from its release."""

    name: str
    family: str
    transformer: Component
    scheduler_config: Optional[Path] = None
    image_encoder: Optional[LazyComponent] = None  # V3 InP releases: CLIP for image-to-video
    companions: tuple = field(default=(), compare=False, repr=False)  # (VAEHandle, T5Handle) loaded with it

    def with_transformer(self, component: Component) -> "ModelHandle":
        return replace(self, transformer=component)


@dataclass(frozen=True)
class VAEHandle:
    """EASYANIMATE_VAE: a loaded VideoVAE and the host component that places its network."""

    vae: object
    component: Component
    preview_cache: dict = field(default_factory=dict, compare=False, repr=False)  # latent->RGB preview factors


@dataclass(frozen=True)
class T5Handle:
    """EASYANIMATE_T5: a (lazily loaded) T5 encoder plus LoRAs to apply to it, as (file path, strength)."""

    source: LazyComponent
    loras: tuple = ()

    def with_lora(self, path: Path, strength: float) -> "T5Handle":
        return self if strength == 0 else replace(self, loras=self.loras + ((Path(path), float(strength)),))
