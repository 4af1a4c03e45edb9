"""Multi-head attention and feed-forward layers with the key names of the released checkpoints.

`to_q/to_k/to_v/to_out.0` and `ff.net.0.proj/ff.net.2` are diffusers' names; the checkpoints use them,
so these modules keep them. Attention runs through `scaled_dot_product_attention`, which picks the
memory-efficient kernel the device offers, unless a host sets its own attention function for a scope
(`attention_function`: inside ComfyUI, ComfyUI's attention backends).

Memory: under a memory budget the transformer sets two limits for its forward's scope (context
variables, so nothing is stored on the modules): `feed_forward_chunks(n)` makes every feed-forward run
over the tokens in row chunks whose inner activation stays under n bytes, and `query_chunks(n)` makes
every attention process at most n queries at a time (for devices whose SDPA kernel would materialise
the full score matrix). Rows and queries are independent, so the results are the same. Outside such a
scope (no budget) both run whole: smaller matrix products cost time, and no one asked for the memory.
"""
from contextlib import contextmanager
from contextvars import ContextVar

import torch
import torch.nn as nn
import torch.nn.functional as F

# When a budget asks for feed-forward chunks: the largest inner (4x wide, GEGLU 8x) activation a chunk
# computes at once, and the fewest rows a chunk gets (the matrix products stay efficient and give the
# same numbers as the whole batch).
FEED_FORWARD_CHUNK_BYTES = 8 * 2**20
MIN_CHUNK_ROWS = 128

_QUERY_CHUNK: ContextVar = ContextVar("easyanimate_query_chunk", default=None)
_FEED_FORWARD_BYTES: ContextVar = ContextVar("easyanimate_feed_forward_bytes", default=None)
_ATTENTION_FN: ContextVar = ContextVar("easyanimate_attention_fn", default=None)


@contextmanager
def attention_function(fn, *, override: bool = True):
    """Within the block, every `Attention` calls `fn(q, k, v, heads, bias)` instead of SDPA: q/k/v are
    (N, heads, L, head_dim), bias an additive (N, 1, 1, Lk) or None; it returns (N, Lq, heads * head_dim).
    A host sets it (ComfyUI: its attention backends and their patches); None, or no scope: SDPA.
    `override=False` keeps a function an enclosing scope already set."""
    if fn is None or (not override and _ATTENTION_FN.get() is not None):
        yield
        return
    token = _ATTENTION_FN.set(fn)
    try:
        yield
    finally:
        _ATTENTION_FN.reset(token)


def host_attention():
    """The attention function a host set for the current scope (`attention_function`), or None (SDPA)."""
    return _ATTENTION_FN.get()


@contextmanager
def query_chunks(rows: int | None):
    """Within the block, attention computes at most `rows` queries at a time (None: all at once)."""
    token = _QUERY_CHUNK.set(rows)
    try:
        yield
    finally:
        _QUERY_CHUNK.reset(token)


@contextmanager
def feed_forward_chunks(max_bytes: int | None):
    """Within the block, each feed-forward computes its inner activation for at most `max_bytes` (and
    `FEED_FORWARD_CHUNK_BYTES`) at a time, in chunks of at least `MIN_CHUNK_ROWS` rows; None: all rows at once."""
    token = _FEED_FORWARD_BYTES.set(max_bytes)
    try:
        yield
    finally:
        _FEED_FORWARD_BYTES.reset(token)


class Attention(nn.Module):
    def __init__(self, query_dim, heads, head_dim, context_dim=None, qkv_bias=True,
                 dtype=None, device=None, operations=nn):
        super().__init__()
        inner = heads * head_dim
        context_dim = context_dim or query_dim
        self.heads = heads
        self.to_q = operations.Linear(query_dim, inner, bias=qkv_bias, dtype=dtype, device=device)
        self.to_k = operations.Linear(context_dim, inner, bias=qkv_bias, dtype=dtype, device=device)
        self.to_v = operations.Linear(context_dim, inner, bias=qkv_bias, dtype=dtype, device=device)
        self.to_out = nn.ModuleList([operations.Linear(inner, query_dim, bias=True, dtype=dtype, device=device)])

    def forward(self, x, context=None, bias=None):
        """x (N, Lq, D); context (N, Lk, Dc) or None for self-attention; bias (N, 1, Lk) additive or None."""
        context = x if context is None else context
        q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)
        n = x.shape[0]
        q, k, v = (t.view(n, -1, self.heads, t.shape[-1] // self.heads).transpose(1, 2) for t in (q, k, v))
        if bias is not None:
            bias = bias.to(q.dtype)[:, None]  # (N, 1, 1, Lk): same bias for every head and query
        fn = _ATTENTION_FN.get()
        if fn is not None:  # a host's attention (`attention_function`)
            return self.to_out[0](fn(q, k, v, self.heads, bias))
        rows = _QUERY_CHUNK.get()
        if rows is None or q.shape[2] <= rows:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        else:  # each query's result depends only on its own row: chunks give the same numbers
            out = torch.cat([F.scaled_dot_product_attention(q[:, :, i : i + rows], k, v, attn_mask=bias)
                             for i in range(0, q.shape[2], rows)], dim=2)
        del q, k, v
        out = out.transpose(1, 2).reshape(n, -1, out.shape[1] * out.shape[-1])
        return self.to_out[0](out)


class GELUProjection(nn.Module):
    """Linear then GELU (tanh approximation): the DiT block's feed-forward input layer."""

    def __init__(self, dim_in, dim_out, dtype=None, device=None, operations=nn):
        super().__init__()
        self.proj = operations.Linear(dim_in, dim_out, bias=True, dtype=dtype, device=device)

    def forward(self, x):
        return F.gelu(self.proj(x), approximate="tanh")


class GEGLU(nn.Module):
    """Gated GELU (exact erf GELU on the gate half): the motion module's feed-forward input layer."""

    def __init__(self, dim_in, dim_out, dtype=None, device=None, operations=nn):
        super().__init__()
        self.proj = operations.Linear(dim_in, dim_out * 2, bias=True, dtype=dtype, device=device)

    def forward(self, x):
        value, gate = self.proj(x).chunk(2, dim=-1)
        return value * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim, gated=False, mult=4, dtype=None, device=None, operations=nn):
        super().__init__()
        inner = dim * mult
        self.inner_width = inner * 2 if gated else inner  # the widest activation: the first layer's output
        first = (GEGLU if gated else GELUProjection)(dim, inner, dtype=dtype, device=device, operations=operations)
        # Index 1 held a Dropout in the reference; keeping the slot keeps the `net.2` key name.
        self.net = nn.ModuleList([first, nn.Identity(), operations.Linear(inner, dim, bias=True, dtype=dtype, device=device)])

    def forward(self, x):
        limit = _FEED_FORWARD_BYTES.get()
        if limit is None:
            return self._rows(x)
        rows = x.numel() // x.shape[-1]
        chunk = max(MIN_CHUNK_ROWS, min(limit, FEED_FORWARD_CHUNK_BYTES) // (self.inner_width * x.element_size()))
        if rows <= chunk:
            return self._rows(x)
        flat = x.reshape(rows, x.shape[-1])
        out = None
        for start in range(0, rows, chunk):
            part = self._rows(flat[start : start + chunk])
            if out is None:
                out = part.new_empty(rows, part.shape[-1])
            out[start : start + len(part)] = part
            del part
        return out.view(*x.shape[:-1], out.shape[-1])

    def _rows(self, x):
        for layer in self.net:
            x = layer(x)
        return x


def layer_norm(x: torch.Tensor, eps: float, in_fp32: bool) -> torch.Tensor:
    """LayerNorm without affine parameters; V3 computes it in float32 and casts back (`FP32LayerNorm`)."""
    if in_fp32:
        return F.layer_norm(x.float(), x.shape[-1:], eps=eps).to(x.dtype)
    return F.layer_norm(x, x.shape[-1:], eps=eps)


def make_layer_norm(operations, dim, eps, in_fp32, dtype=None, device=None):
    """An affine LayerNorm from `operations`; with `in_fp32` it normalises in float32 like V3's `FP32LayerNorm`."""
    norm = operations.LayerNorm(dim, eps=eps, elementwise_affine=True, dtype=dtype, device=device)
    norm.compute_in_fp32 = in_fp32
    return norm


def apply_layer_norm(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    if not getattr(norm, "compute_in_fp32", False) or x.dtype == torch.float32:
        return norm(x)
    w, b = norm.weight, norm.bias
    return F.layer_norm(
        x.float(), norm.normalized_shape, w.to(x.device, torch.float32), b.to(x.device, torch.float32), norm.eps
    ).to(x.dtype)
