"""TeaCache for the EasyAnimate V5.1 transformer: skip a sampling step's transformer call when its input has
barely changed since the last call that was computed, and reuse what the blocks added then.

TeaCache (Liu et al. 2024, "Timestep Embedding Tells: It's Time to Cache for Video Diffusion Model") watches
a cheap proxy of how much the blocks' output will change: the modulated input of the first block. EasyAnimate
V5.1 applies it per transformer call (one call per sampling step, both halves of the guidance batch together):

    m      = block 0's modulated video input: norm1(patch tokens, text tokens, timestep embedding)[video]
    first and last call of the run    -> compute, accumulator = 0
    any other call                    -> r = mean|m − m_prev| / mean|m_prev|,  acc += P(r)
                                         acc < threshold -> skip;  otherwise compute, acc = 0
    m_prev = m                           (after every call, skipped or not)

    compute: the blocks, norm_final, norm_out as usual; residual = norm_out's output − the patch tokens
    skip:    norm_out's output := the patch tokens + the residual of the last computed call
             (proj_out and the unpatchify run as usual)

P is a degree-4 polynomial fitted per model that maps the proxy's change to the change of the output
(`COEFFICIENTS`). P(0) > 0, so even a constant input adds up: at threshold 0.08 the 12B set skips at most
5 calls in a row. The reference picks the coefficient set from a substring of the model's path; here it
follows the transformer's geometry (`coefficients_for`): the 7B set for the 7B geometry (36 blocks, 18 of
them MMDiT, width 3072), the 12B set (also the reference method's default) for every other V5.1 model. The
reference turns TeaCache off for V5 (no fitted set is wired up for it): here V5 needs explicit coefficients,
`TeaCache(threshold, coefficients=...)`.

State belongs to one sampling run (`TeaCacheRun`), built for the number of transformer calls that run
actually makes (with a video-to-video strength below 1, the steps after the first kept one), so its last call
is the one forced, and nothing carries over into the next run (the reference's scripts enable it once per
process and size it by the full step count, so there the last call is not forced and its state leaks into
the next run). The previous modulated input and the residual are kept in CPU RAM, as the reference keeps
them, so TeaCache costs no accelerator memory; their values do not depend on where they are kept.

    latents = generate(..., teacache=0.1)                         # threshold; model's own coefficients
    latents = generate(..., teacache=TeaCache(0.1, COEFFICIENTS["v5.1-12b"]))
    with record_runs() as runs:
        make_video(model, prompt, teacache=0.08, ...)
    runs[-1].computed_calls, runs[-1].skipped_calls
"""
from __future__ import annotations

import math
import numbers
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import numpy as np
import torch

from .errors import EasyAnimateError

# Rescaling polynomials (highest degree first) the reference ships: fitted on T2V-CompBench samples of the
# InP models; each also applies to that size's Control models. The V5 7B InP set is in the reference's
# source as a comment only.
COEFFICIENTS = {
    "v5.1-12b": (-10.47857366, 8.33844143, -0.78477557, 0.68798618, 0.0136149),
    "v5.1-7b": (1.07862322, -4.19362456, 3.06725828, 0.33161686, 0.02374758),
    "v5-7b-inp": (-3.64204720e03, 1.43764725e03, -1.93045263e02, 1.09596499e01, -1.70663507e-01),
}
# Thresholds the reference uses: its predict scripts and Gradio UI 0.08, its ComfyUI nodes 0.10.
RECOMMENDED_THRESHOLD = 0.08
# Where the previous modulated input and the residual wait between calls.
STORAGE_DEVICE = "cpu"


@dataclass(frozen=True)
class TeaCache:
    """TeaCache settings of a run: the skip `threshold` (≥ 0; 0.05–0.1 recommended, higher skips more) and
    the rescaling polynomial (None: the model's own set, `coefficients_for`)."""

    threshold: float
    coefficients: Optional[tuple] = None

    def __post_init__(self):
        value = self.threshold
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value < 0:
            raise EasyAnimateError(
                f"The TeaCache threshold must be a finite number ≥ 0 (0.05 to 0.1 recommended; higher skips more "
                f"transformer calls); got {value!r}."
            )
        object.__setattr__(self, "threshold", float(value))
        if self.coefficients is not None:
            object.__setattr__(self, "coefficients", check_coefficients(self.coefficients))


def check_coefficients(coefficients: Sequence[float]) -> tuple:
    """A rescaling polynomial as a tuple of finite floats (highest degree first), or an error saying why not."""
    try:
        values = tuple(float(c) for c in coefficients)
    except (TypeError, ValueError):
        values = ()
    if not values or not all(math.isfinite(v) for v in values):
        known = ", ".join(COEFFICIENTS)
        raise EasyAnimateError(
            f"TeaCache coefficients must be finite numbers, highest degree first (the releases' sets: {known}); "
            f"got {coefficients!r}."
        )
    return values


def teacache_options(value: Union[None, float, TeaCache]) -> Optional[TeaCache]:
    """None (off), a threshold, or a `TeaCache` -> `TeaCache` or None."""
    if value is None or isinstance(value, TeaCache):
        return value
    return TeaCache(value)


def coefficients_for(config) -> tuple:
    """The rescaling polynomial for a V5/V5.1 transformer config (`models.mmdit.MMDiTConfig`)."""
    if config.family == "v51":
        return COEFFICIENTS["v5.1-7b" if config.release_size == "7B" else "v5.1-12b"]
    raise EasyAnimateError(
        f"TeaCache has no coefficients for {config.name}: its rescaling polynomial was fitted on EasyAnimate V5.1 "
        "models, and the reference turns TeaCache off for V5. To force it, give the coefficients: "
        "TeaCache(threshold, coefficients=COEFFICIENTS['v5.1-12b']) (what the reference's ComfyUI nodes use for "
        "every model) or COEFFICIENTS['v5-7b-inp'] (a fit for the V5 7B InP model left unused in the reference's "
        "source); on the command line --teacache-coefficients v5.1-12b or v5-7b-inp."
    )


def resolve(value: Union[None, float, TeaCache], config) -> Optional[TeaCache]:
    """The settings a run of this transformer uses: the threshold and its coefficients, or None (off). Refuses
    a transformer TeaCache does not know (V1–V3) and V5 without explicit coefficients."""
    options = teacache_options(value)
    if options is None:
        return None
    if getattr(config, "family", None) not in ("v5", "v51"):
        raise EasyAnimateError(
            "TeaCache is implemented for the EasyAnimate V5.1 (and, with explicit coefficients, V5) transformers; "
            f"this model is EasyAnimate {str(getattr(config, 'family', '?')).upper()}. Leave teacache unset."
        )
    if options.coefficients is None:
        options = TeaCache(options.threshold, coefficients_for(config))
    return options


# ----------------------------------------------------------------------------------------------------
# One run's state, and the scope the transformer finds it in
# ----------------------------------------------------------------------------------------------------

class TeaCacheRun:
    """The state of TeaCache over one sampling run of `calls` transformer calls.

    The transformer asks `should_compute` on every call; after a computed call it hands over norm_out's
    output (`remember`), for a skipped one it gets the output back from the tokens (`reuse`). `decisions`
    (True = computed) and `distances` (the relative L1 change, None for the first and last call, which are
    always computed) record the run.
    """

    def __init__(self, options: TeaCache, calls: int):
        if options.coefficients is None:
            raise EasyAnimateError("A TeaCache run needs its coefficients; resolve the settings for the model first.")
        if isinstance(calls, bool) or not isinstance(calls, numbers.Integral) or calls < 1:
            raise EasyAnimateError(f"A TeaCache run needs the number of transformer calls (≥ 1); got {calls!r}.")
        self.threshold = options.threshold
        self.coefficients = options.coefficients
        self.calls = int(calls)
        self.accumulated = 0.0
        self.decisions: list[bool] = []
        self.distances: list[Optional[float]] = []
        self._previous_input: Optional[torch.Tensor] = None
        self._tokens: Optional[torch.Tensor] = None  # the patch tokens of the call being computed
        self._residual: Optional[torch.Tensor] = None
        recording = _RECORDED.get()
        if recording is not None:
            recording.append(self)

    @property
    def computed_calls(self) -> int:
        return sum(self.decisions)

    @property
    def skipped_calls(self) -> int:
        return len(self.decisions) - self.computed_calls

    def rescaled(self, distance: float) -> float:
        """P(distance): the polynomial in float64, as numpy's poly1d evaluates it."""
        return float(np.polyval(np.asarray(self.coefficients, dtype=np.float64), distance))

    def should_compute(self, block0_norm, tokens: torch.Tensor, text: torch.Tensor, temb: torch.Tensor) -> bool:
        """Decide this call from block 0's modulated video input (`block0_norm`: that block's `norm1`)."""
        call = len(self.decisions)
        if call >= self.calls:
            raise EasyAnimateError(
                f"This TeaCache run was set up for {self.calls} transformer calls and got another one; a run's "
                "calls must be its sampling steps, one call each with the whole guidance batch."
            )
        modulated = _call_on_device(block0_norm, tokens, text, temb)[0].detach()  # a probe, never trained through
        previous = self._previous_input
        if previous is not None and previous.shape != modulated.shape:
            raise EasyAnimateError(
                f"TeaCache compares successive calls of one run, but this call's tokens {tuple(modulated.shape)} "
                f"differ from the last call's {tuple(previous.shape)} (another batch or size within the run)."
            )
        distance = None
        if call == 0 or call == self.calls - 1:
            compute = True
            self.accumulated = 0.0
        else:
            previous = previous.to(modulated.device)
            # In the working dtype, as the reference computes it; then a Python float.
            distance = ((modulated - previous).abs().mean() / previous.abs().mean()).item()
            self.accumulated += self.rescaled(distance)
            compute = not self.accumulated < self.threshold
            if compute:
                self.accumulated = 0.0
        self._previous_input = modulated.to(STORAGE_DEVICE, copy=True)
        self.decisions.append(compute)
        self.distances.append(distance)
        # The tokens are kept (in CPU RAM) until norm_out's output is known: the residual is their difference.
        self._tokens = tokens.detach().to(STORAGE_DEVICE, copy=True) if compute else None
        return compute

    def remember(self, output: torch.Tensor) -> None:
        """After a computed call: norm_out's output; keeps output − tokens for the calls it skips next."""
        self._residual = output.detach().to(STORAGE_DEVICE) - self._tokens
        self._tokens = None

    def reuse(self, tokens: torch.Tensor) -> torch.Tensor:
        """For a skipped call: the tokens plus the last computed call's residual (in place on the tokens)."""
        return tokens.add_(self._residual.to(tokens.device))


_ACTIVE: ContextVar = ContextVar("easyanimate_teacache", default=None)
_RECORDED: ContextVar = ContextVar("easyanimate_teacache_recorded", default=None)


@contextmanager
def running(run: Optional[TeaCacheRun]):
    """Within the block, the V5/V5.1 transformer's calls go through `run` (None: TeaCache off)."""
    token = _ACTIVE.set(run)
    try:
        yield run
    finally:
        _ACTIVE.reset(token)


def active_run() -> Optional[TeaCacheRun]:
    """The TeaCache run of the current scope, or None."""
    return _ACTIVE.get()


@contextmanager
def record_runs():
    """Collect every TeaCache run started within the block (for reports and tests): yields the list."""
    runs: list[TeaCacheRun] = []
    token = _RECORDED.set(runs)
    try:
        yield runs
    finally:
        _RECORDED.reset(token)


def _call_on_device(module: torch.nn.Module, *args: torch.Tensor):
    """`module(*args)`, with its weights brought to the inputs' device for this call if they are elsewhere:
    a block-swap host may keep block 0 in CPU RAM until the block itself runs, after this probe."""
    device = args[0].device
    tensors = dict(module.named_parameters())
    tensors.update(module.named_buffers())
    if all(t.device == device for t in tensors.values()):
        return module(*args)
    moved = {name: t.to(device) for name, t in tensors.items()}
    return torch.func.functional_call(module, moved, args)
