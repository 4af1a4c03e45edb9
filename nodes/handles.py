"""The objects that travel along the pack's custom sockets.

Each is immutable from the graph's point of view: a node that changes something (a LoRA loader) returns
a new handle that shares the loaded weights, so branches of a workflow never affect each other. Models
are held as host `Component`s (see `easyanimate.host`), which the host places for each stage.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Optional

from ..easyanimate.host import Component
from .host import current_host

MODEL = "EASYANIMATE_MODEL"
VAE = "EASYANIMATE_VAE"
T5 = "EASYANIMATE_T5"  # the release's text encoder(s): T5 (V1–V3), Qwen2-VL (V5.1), Bert + mT5 (V5)
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


class ReleasedAfterUse(LazyComponent):
    """A text encoder that gives its memory back after each use, so the transformer that runs next gets it
    (V5.1's Qwen2-VL-7B holds about 13 GiB of bf16 weights; the 12B transformer alone does not fit a 24 GB GPU).

    Inside ComfyUI the encoder leaves the GPU and stays in RAM as any ComfyUI model does (its patcher, kept alive
    by the loader's cached output); standalone its weights are dropped (`release()`) and read again when a new
    prompt comes. Either way the embeddings it made are kept (`cached` / `remember`, a small LRU keyed by the
    prompts and the text LoRAs), so encoding the same prompts again loads nothing.
    """

    CACHE_SIZE = 16

    def __init__(self, load, kind: str):
        super().__init__(load, kind)
        self._embeddings: OrderedDict = OrderedDict()

    def cached(self, key: tuple):
        with self._lock:
            value = self._embeddings.get(key)
            if value is not None:
                self._embeddings.move_to_end(key)
            return value

    def remember(self, key: tuple, value) -> None:
        with self._lock:
            self._embeddings[key] = value
            while len(self._embeddings) > self.CACHE_SIZE:
                self._embeddings.popitem(last=False)

    def release(self, component: Component) -> None:
        """After use: `component` (the encoder's, or a LoRA clone of it) off the compute device."""
        runtime = current_host()
        with self._lock:
            if runtime.name == "comfyui":
                runtime.unload(component)
            elif self.model is not None:
                self.model.release()
                self.model = self.component = None


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


# The text encoders a release can have, by the name a T5Handle gives them.
TEXT_ENCODERS = {"t5": "T5 (EasyAnimate V1–V3)", "qwen2-vl": "Qwen2-VL (EasyAnimate V5.1)",
                 "bert+mt5": "Bert + mT5 (EasyAnimate V5)"}


@dataclass(frozen=True)
class T5Handle:
    """EASYANIMATE_T5: a release's (lazily loaded) text encoder plus LoRAs to apply to it, as (file path,
    strength). `encoder` says which one it is (a key of TEXT_ENCODERS); the socket keeps its V1–V3 name so
    that saved workflows keep their links."""

    source: LazyComponent
    loras: tuple = ()
    encoder: str = "t5"

    @property
    def description(self) -> str:
        return TEXT_ENCODERS[self.encoder]

    def with_lora(self, path: Path, strength: float) -> "T5Handle":
        return self if strength == 0 else replace(self, loras=self.loras + ((Path(path), float(strength)),))
