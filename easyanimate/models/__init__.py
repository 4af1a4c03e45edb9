"""Model modules. Each takes `dtype`, `device` and `operations` (default `torch.nn`) so a host such as
ComfyUI can swap in its own casting / low-VRAM layer classes without touching this code."""
