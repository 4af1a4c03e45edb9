"""ComfyUI nodes of the pack: the only package that talks to ComfyUI.

Node modules import `comfy`, `folder_paths` and the model core inside their functions, so this
package imports cheaply with or without ComfyUI.
"""
NODE_CLASS_MAPPINGS: dict = {}
NODE_DISPLAY_NAME_MAPPINGS: dict = {}
