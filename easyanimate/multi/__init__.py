"""MuLTI video-and-language understanding (Xu et al., AAAI 2024; our reconstruction: docs/numerics.md#multi).

Importing this package is cheap: `transformers` is imported only when a model is built. Map:

* `config.py`     MuLTIConfig (JSON), presets in `configs/` (multi-tiny, multi-base).
* `model.py`      MuLTI: ViT/CLIP video encoder per frame + temporal embedding, BERT text encoder,
                  fusion, heads (VTC, VTM, MCM, QA, tags, MLM); init_vision_from / init_text_from.
* `sampler.py`    Text-Guided MultiWay-Sampler, its block-pooling helpers, the flatten-fusion baseline.
* `adapter.py`    v1 attention-based adapter on shallow encoder features (frozen layers below it).
* `losses.py`     VTC, VTM with hard negatives, MLM masking + loss, MCM, QA, tags; pretrain_step_losses.
* `preprocess.py` segment frame sampling, resize/crop/normalise (ComfyUI IMAGE layout in).
* `io.py`         save_multi / load_multi: config.json + model.safetensors + tokenizer files.
* `tokenizer.py`, `data.py`, `train.py`, `evaluate.py`, `cli.py`: tokenizer, synthetic data, training,
  evaluation and command line.
"""
import importlib

_LAZY = {
    "MuLTIConfig": "config",
    "load_config": "config",
    "MuLTI": "model",
    "Fused": "sampler",
    "TextGuidedMultiWaySampler": "sampler",
    "FlattenFusion": "sampler",
    "prepare_frames": "preprocess",
    "sample_frame_indices": "preprocess",
    "save_multi": "io",
    "load_multi": "io",
    "MuLTIBundle": "io",
}


def __getattr__(name):
    if name in _LAZY:
        module = importlib.import_module(f".{_LAZY[name]}", __name__)
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = sorted(_LAZY)
