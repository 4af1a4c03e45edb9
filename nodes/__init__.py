"""ComfyUI nodes of the pack: the only package that talks to ComfyUI.

Node modules import `comfy`, `folder_paths` and the heavy parts of the model core inside their functions
(see `host.py`), so this package imports cheaply with or without ComfyUI.
"""
import logging

from . import host
from .conditioning import EasyAnimateT5Encode, EasyAnimateV5TextEncode
from .loaders import EasyAnimateLoRALoader, LoadEasyAnimate
from .multi import MuLTILoader, MuLTITags, MuLTIVideoQA, MuLTIVideoTextScore
from .native import NODES as NATIVE_NODES
from .sampling import EasyAnimateSampler
from .video import EasyAnimateSliceVAEDecode, EasyAnimateVAEEncode

NODE_CLASS_MAPPINGS = {
    "LoadEasyAnimate": LoadEasyAnimate,
    "EasyAnimateT5Encode": EasyAnimateT5Encode,
    "EasyAnimateV5TextEncode": EasyAnimateV5TextEncode,
    "EasyAnimateSampler": EasyAnimateSampler,
    "EasyAnimateSliceVAEDecode": EasyAnimateSliceVAEDecode,
    "EasyAnimateVAEEncode": EasyAnimateVAEEncode,
    "EasyAnimateLoRALoader": EasyAnimateLoRALoader,
    "MuLTILoader": MuLTILoader,
    "MuLTIVideoTextScore": MuLTIVideoTextScore,
    "MuLTIVideoQA": MuLTIVideoQA,
    "MuLTITags": MuLTITags,
    **{node_id: cls for node_id, (cls, _) in NATIVE_NODES.items()},
}

NODE_DISPLAY_NAME_MAPPINGS = {
    "LoadEasyAnimate": "Load EasyAnimate",
    "EasyAnimateT5Encode": "T5 Encode (EasyAnimate)",
    "EasyAnimateV5TextEncode": "Text Encode V5/V5.1 (EasyAnimate)",
    "EasyAnimateSampler": "EasyAnimate Sampler",
    "EasyAnimateSliceVAEDecode": "Slice VAE Decode (EasyAnimate)",
    "EasyAnimateVAEEncode": "VAE Encode (EasyAnimate)",
    "EasyAnimateLoRALoader": "LoRA Loader (EasyAnimate)",
    "MuLTILoader": "MuLTI Loader",
    "MuLTIVideoTextScore": "MuLTI Video-Text Score",
    "MuLTIVideoQA": "MuLTI Video QA",
    "MuLTITags": "MuLTI Tags",
    **{node_id: name for node_id, (_, name) in NATIVE_NODES.items()},
}

if host.inside_comfyui():
    # Inside ComfyUI the host is made now, so that ComfyUI's own LoRA loaders see our key names and the demo
    # LoRAs before any of our nodes runs. A broken ComfyUI is reported again by the first node that runs.
    try:
        host.current_host()
    except Exception:  # noqa: BLE001
        logging.getLogger(__name__).exception("EasyAnimate: ComfyUI's host could not be set up")
