"""Errors the pack raises for bad input.

Every message names the problem and what to do about it, so that a ComfyUI user reading it in the
red node box knows which file or setting to change.
"""


class EasyAnimateError(ValueError):
    """Base class: bad input that the user can fix."""


class UnsupportedModelError(EasyAnimateError):
    """A recognised model that this pack does not run (EasyAnimate V4/V5, other architectures)."""


class LayoutError(EasyAnimateError):
    """A folder or file whose layout matches no released EasyAnimate checkpoint."""


class CheckpointMismatchError(EasyAnimateError):
    """A checkpoint whose tensor names or shapes do not fit the model built from its config."""


class CorruptCheckpointError(EasyAnimateError):
    """A weights file that cannot be read: truncated download, wrong format, damaged header."""
