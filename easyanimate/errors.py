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


# Seeds the pack accepts. The pipeline also seeds generators with seed + 1 and seed + 2, and torch takes
# seeds below 2**64, so 0 ... 2**63 - 1 leaves room for both.
MAX_SEED = 2**63 - 1


def check_finite(tensor, what: str):
    """Return `tensor` unchanged if every value is finite; otherwise raise EasyAnimateError naming `what`.

    For inputs (start images, frames, LoRA weights) that would otherwise turn a whole video into NaN,
    i.e. black frames, without any error. Integer tensors are always finite. `what` names the input
    and, where it helps, how to fix it: "start image 'cat.png'", "LoRA 'x.safetensors' tensor 'k'".
    """
    import torch

    if not isinstance(tensor, torch.Tensor) or not (tensor.is_floating_point() or tensor.is_complex()):
        return tensor
    values = tensor if tensor.dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16) else tensor.float()
    finite = torch.isfinite(values)
    if not bool(finite.all()):
        bad = int((~finite).sum())
        kinds = []
        if bool(torch.isnan(values).any()):
            kinds.append("NaN")
        if bool(torch.isinf(values).any()):
            kinds.append("infinity")
        raise EasyAnimateError(
            f"The {what} holds {bad} non-finite value{'s' if bad != 1 else ''} ({' and '.join(kinds)}) out of "
            f"{values.numel()}; it would turn the result into NaN (black frames). Use an input with finite values "
            "(a damaged file or a diverged computation is the usual cause)."
        )
    return tensor


def check_seed(seed, what: str = "The seed") -> int:
    """An integer seed in 0 ... MAX_SEED (2**63 - 1), or EasyAnimateError giving the range."""
    if isinstance(seed, bool) or not isinstance(seed, int):
        try:
            if float(seed) != int(seed):
                raise ValueError
            seed = int(seed)
        except (TypeError, ValueError, OverflowError):
            raise EasyAnimateError(f"{what} must be a whole number from 0 to {MAX_SEED}; got {seed!r}.") from None
    if not 0 <= seed <= MAX_SEED:
        raise EasyAnimateError(f"{what} must be a whole number from 0 to {MAX_SEED} (2**63 - 1); got {seed}.")
    return seed
