"""ComfyUI entry point of the EasyAnimate + MuLTI node pack.

Importing this module registers node classes only: no model is built, no weights are read and
ComfyUI does not have to be present (the node classes import `comfy` lazily when they run).
"""
from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
