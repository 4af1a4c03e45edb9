"""ComfyUI nodes of the pack: the only package that talks to ComfyUI.

Node modules import `comfy`, `folder_paths` and the heavy parts of the model core inside their functions
(see `host.py`), so this package imports cheaply with or without ComfyUI.
"""
from .conditioning import EasyAnimateT5Encode
from .loaders import EasyAnimateLoRALoader, LoadEasyAnimate
from .multi import MuLTILoader, MuLTITags, MuLTIVideoQA, MuLTIVideoTextScore
from .sampling import EasyAnimateSampler
from .video import EasyAnimateSliceVAEDecode, EasyAnimateVAEEncode

NODE_CLASS_MAPPINGS = {
    "LoadEasyAnimate": LoadEasyAnimate,
    "EasyAnimateT5Encode": EasyAnimateT5Encode,
    "EasyAnimateSampler": EasyAnimateSampler,
    "EasyAnimateSliceVAEDecode": EasyAnimateSliceVAEDecode,
    "EasyAnimateVAEEncode": EasyAnimateVAEEncode,
    "EasyAnimateLoRALoader": EasyAnimateLoRALoader,
    "MuLTILoader": MuLTILoader,
    "MuLTIVideoTextScore": MuLTIVideoTextScore,
    "MuLTIVideoQA": MuLTIVideoQA,
    "MuLTITags": MuLTITags,
}

NODE_DISPLAY_NAME_MAPPINGS = {
    "LoadEasyAnimate": "Load EasyAnimate",
    "EasyAnimateT5Encode": "T5 Encode (EasyAnimate)",
    "EasyAnimateSampler": "EasyAnimate Sampler",
    "EasyAnimateSliceVAEDecode": "Slice VAE Decode (EasyAnimate)",
    "EasyAnimateVAEEncode": "VAE Encode (EasyAnimate)",
    "EasyAnimateLoRALoader": "LoRA Loader (EasyAnimate)",
    "MuLTILoader": "MuLTI Loader",
    "MuLTIVideoTextScore": "MuLTI Video-Text Score",
    "MuLTIVideoQA": "MuLTI Video QA",
    "MuLTITags": "MuLTI Tags",
}
