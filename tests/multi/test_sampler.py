"""The Text-Guided MultiWay-Sampler (docs/numerics.md#text-guided-block-pooling): pooling equivalences, shapes for any
frame count and odd grids, padding invariance, MultiWay routing, and the memory benchmark's smoke run."""
from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from easyanimate.multi.config import RESIDUAL_MODES, SamplerConfig
from easyanimate.multi.sampler import (
    FlattenFusion,
    TextGuidedMultiWaySampler,
    adaptive_bounds,
    condense_text_tokens,
    pool_blocks,
    video_block_table,
)

ROOT = Path(__file__).resolve().parents[2]
D = 16


def make_sampler(**kw) -> TextGuidedMultiWaySampler:
    torch.manual_seed(0)
    config = {"layers": 2, "heads": 2, "grid": (4, 2, 2), "guide_dim": 8, "text_keep_max": 12, **kw}
    return TextGuidedMultiWaySampler(SamplerConfig(**config), D).eval()


def features(B=2, T=3, h=5, w=5, L=7, valid=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    video = torch.randn(B, T, 1 + h * w, D, generator=g)
    text = torch.randn(B, L, D, generator=g)
    mask = torch.zeros(B, L, dtype=torch.bool)
    for row, n in enumerate(valid or [L] * B):
        mask[row, :n] = True
    return video, text, mask


def patch_grid(video, h, w):
    """(B, T, 1 + h*w, d) -> (B, d, T, h, w), the layout adaptive_avg_pool3d takes."""
    B, T, _, d = video.shape
    return video[:, :, 1:].reshape(B, T, h, w, d).permute(0, 4, 1, 2, 3)


@pytest.mark.parametrize("size_in,size_out", [(14, 4), (5, 2), (7, 3), (3, 4), (16, 16), (1, 1)])
def test_adaptive_bounds_match_pytorch(size_in, size_out):
    x = torch.randn(1, 1, size_in, dtype=torch.float64)
    ours = torch.stack([x[..., a:b].mean(-1) for a, b in adaptive_bounds(size_in, size_out)], -1)
    torch.testing.assert_close(ours, F.adaptive_avg_pool1d(x, size_out), rtol=0, atol=1e-12)


@pytest.mark.parametrize("T,h,w,grid", [(3, 5, 5, (4, 2, 2)), (8, 7, 5, (4, 3, 2)), (1, 4, 4, (4, 2, 2)),
                                        (20, 3, 3, (16, 4, 4)), (5, 14, 14, (4, 4, 4))])
def test_uniform_guidance_is_adaptive_avg_pool3d(T, h, w, grid):
    """W_q = 0 (the initialisation): the text-guided pool is exactly adaptive average pooling."""
    sampler = make_sampler(grid=grid)
    assert torch.count_nonzero(sampler.guide_query.weight) == 0
    video, text, _ = features(T=T, h=h, w=w)
    slots = sampler.video_slots(video, text[:, 0], (h, w), guided=True)
    reference = F.adaptive_avg_pool3d(patch_grid(video, h, w), (min(T, grid[0]), grid[1], grid[2]))
    reference = reference.flatten(2).transpose(1, 2)
    torch.testing.assert_close(slots[:, 1:], reference, rtol=0, atol=1e-6)
    torch.testing.assert_close(slots[:, 0], video[:, :, 0].mean(1), rtol=0, atol=1e-6)


def test_guidance_off_is_adaptive_avg_pool3d_even_with_trained_wq():
    sampler = make_sampler()
    torch.nn.init.normal_(sampler.guide_query.weight)
    video, text, _ = features(T=4, h=5, w=5)
    guided = sampler.video_slots(video, text[:, 0], (5, 5), guided=True)
    plain = sampler.video_slots(video, text[:, 0], (5, 5), guided=False)
    reference = F.adaptive_avg_pool3d(patch_grid(video, 5, 5), (4, 2, 2)).flatten(2).transpose(1, 2)
    torch.testing.assert_close(plain[:, 1:], reference, rtol=0, atol=1e-6)
    assert (guided[:, 1:] - reference).abs().max() > 1e-3  # guidance changes the weights


def test_guided_pool_is_a_convex_combination_inside_each_block():
    """Text-guided weights are a softmax over each block's own tokens: with one-hot scores the pooled token
    is that token, and a score on a token outside the block changes nothing."""
    index, valid = video_block_table(2, (3, 3), (2, 2, 2))
    tokens = torch.randn(1, 2 * 10, D)
    scores = torch.zeros(1, 20)
    picked = index[0, 0].item()
    scores[0, picked] = 1e4
    pooled = pool_blocks(tokens, index, valid, scores)
    torch.testing.assert_close(pooled[0, 0], tokens[0, picked])
    uniform = pool_blocks(tokens, index, valid, None)
    torch.testing.assert_close(pooled[0, 1:], uniform[0, 1:])


def test_block_table_covers_every_patch_and_no_cls():
    index, valid = video_block_table(3, (5, 5), (2, 2, 2))
    used = set(index[valid].tolist())
    assert used == {t * 26 + 1 + i for t in range(3) for i in range(25)}


def reference_sampling_layer(sampler, video, text, mask, h, w):
    """The sampling layer composed by hand: adaptive_avg_pool3d queries + plain softmax attention over the
    full sequences, the pooled queries as residual, then one FFN per modality and the output norm."""
    B, T, P, d = video.shape
    layer = sampler.layers[0]
    heads = sampler.config.heads
    pooled = F.adaptive_avg_pool3d(patch_grid(video, h, w), target := (min(T, sampler.config.grid[0]), *sampler.config.grid[1:]))
    queries_v = torch.cat([video[:, :, 0].mean(1, keepdim=True), pooled.flatten(2).transpose(1, 2)], 1)
    nv = 1 + math.prod(target)
    type_v, type_t = sampler.type_embed
    h0 = torch.cat([queries_v + sampler.slot_embed[:nv] + type_v, text + type_t], 1)
    context = torch.cat([video.reshape(B, T * P, d) + type_v, text + type_t], 1)
    keep = torch.cat([torch.ones(B, T * P, dtype=torch.bool), mask], 1)

    attn = layer.attention
    q_in, kv_in = layer.norm_query(h0), layer.norm_context(context)
    split = lambda x: x.view(B, x.shape[1], heads, d // heads).transpose(1, 2)  # noqa: E731
    q, k, v = split(attn.query(q_in)), split(attn.key(kv_in)), split(attn.value(kv_in))
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(d // heads)
    scores = scores.masked_fill(~keep[:, None, None, :], float("-inf"))
    out = (scores.softmax(-1) @ v).transpose(1, 2).reshape(B, -1, d)
    h1 = h0 + attn.out(out)
    hv, ht = h1[:, :nv], h1[:, nv:]
    hv = hv + layer.ffn_video.fc2(F.gelu(layer.ffn_video.fc1(layer.norm_video(hv))))
    ht = ht + layer.ffn_text.fc2(F.gelu(layer.ffn_text.fc1(layer.norm_text(ht))))
    return sampler.norm_out(torch.cat([hv, ht], 1)), nv


@pytest.mark.parametrize("T,h,w", [(3, 5, 5), (6, 4, 3)])
def test_sampling_layer_equals_pool_plus_attention(T, h, w):
    sampler = make_sampler(layers=1)
    video, text, mask = features(T=T, h=h, w=w, L=7, valid=[7, 4])
    fused = sampler(video, text, mask, grid_hw=(h, w))
    expected, nv = reference_sampling_layer(sampler, video, text, mask, h, w)
    torch.testing.assert_close(fused.video, expected[:, :nv], rtol=0, atol=1e-5)
    torch.testing.assert_close(fused.text[mask], expected[:, nv:][mask], rtol=0, atol=1e-5)


@pytest.mark.parametrize("mode", RESIDUAL_MODES)
@pytest.mark.parametrize("T", [1, 3, 4, 8, 20])
def test_shapes_any_frame_count(mode, T):
    sampler = make_sampler(residual_mode=mode)
    for L in (1, 5, 30):  # 30 > text_keep_max = 12: condensed to 12 slots
        video, text, mask = features(T=T, h=5, w=3, L=L)
        fused = sampler(video, text, mask, grid_hw=(5, 3))
        slots = 1 + (16 if mode in ("attn_pool", "learned_query") else min(T, 4) * 4)
        assert fused.video.shape == (2, slots, D)
        assert fused.text.shape == (2, min(L, 12), D) and fused.text_mask.shape == (2, min(L, 12))
        assert fused.cls.shape == (2, D) and torch.isfinite(fused.video).all() and torch.isfinite(fused.text).all()
    # M_v stops growing once T reaches grid[0]
    assert sampler(*features(T=T, h=5, w=3), grid_hw=(5, 3)).video.shape == (2, slots, D)


def test_square_grid_is_inferred():
    sampler = make_sampler()
    video, text, mask = features(T=2, h=5, w=5)
    torch.testing.assert_close(sampler(video, text, mask).video, sampler(video, text, mask, grid_hw=(5, 5)).video)
    with pytest.raises(ValueError, match="square"):
        sampler(features(T=2, h=5, w=3)[0], text, mask)


@pytest.mark.parametrize("mode", RESIDUAL_MODES)
@pytest.mark.parametrize("resample", [False, True])
@pytest.mark.parametrize("valid,length,extra", [((7, 4), 7, 3), ((7, 4), 7, 20), ((30, 9), 30, 5)])
def test_padding_changes_nothing(mode, resample, valid, length, extra):
    """Appending padding (with arbitrary features, mask 0) leaves every output unchanged, also when the
    padding pushes the length past text_keep_max (12) and when the text is condensed anyway."""
    sampler = make_sampler(residual_mode=mode, resample_every_layer=resample)
    video, text, mask = features(T=3, h=5, w=5, L=length, valid=list(valid))
    text = text.masked_fill(~mask[..., None], 0.0)
    padded_text = torch.cat([text, 100 * torch.randn(2, extra, D)], 1)
    padded_text[:, :length][~mask] = 100.0  # the original padding changes too
    padded_mask = torch.cat([mask, torch.zeros(2, extra, dtype=torch.bool)], 1)
    a = sampler(video, text, mask, grid_hw=(5, 5))
    b = sampler(video, padded_text, padded_mask, grid_hw=(5, 5))
    torch.testing.assert_close(b.video, a.video, rtol=0, atol=1e-5)
    n = a.text.shape[1]
    assert not b.text_mask[:, n:].any()
    torch.testing.assert_close(b.text_mask[:, :n], a.text_mask)
    torch.testing.assert_close(b.text[:, :n][a.text_mask], a.text[a.text_mask], rtol=0, atol=1e-5)


def test_condense_text_blocks():
    text = torch.randn(2, 40, D)
    mask = torch.zeros(2, 40, dtype=torch.bool)
    mask[0, :31] = True  # [CLS] + 30 tokens -> 30 tokens into 5 slots of 6
    mask[1, :4] = True  # [CLS] + 3 tokens: kept one per slot
    pooled, slot_mask = condense_text_tokens(text, mask, keep=6)
    assert pooled.shape == (2, 6, D)
    torch.testing.assert_close(pooled[:, 0], text[:, 0])
    for j in range(5):
        torch.testing.assert_close(pooled[0, 1 + j], text[0, 1 + 6 * j: 7 + 6 * j].mean(0))
    torch.testing.assert_close(pooled[1, 1:4], text[1, 1:4], rtol=0, atol=0)
    assert slot_mask.tolist() == [[True] * 6, [True] * 4 + [False] * 2]


def test_multiway_routing_and_one_shared_attention():
    """FFN_v only ever sees video slots and FFN_t only text slots; the attention of a layer is one
    parameter set that sees both; gradients follow the routing."""
    sampler = make_sampler(layers=2)
    video, text, mask = features(T=3, h=5, w=5, L=7, valid=[7, 4])
    seen = {}

    def record(name):
        return lambda module, args, out: seen.setdefault(name, []).append(args[0].shape[1])

    for i, layer in enumerate(sampler.layers):
        layer.ffn_video.register_forward_hook(record(f"{i}.ffn_video"))
        layer.ffn_text.register_forward_hook(record(f"{i}.ffn_text"))
        layer.attention.query.register_forward_hook(record(f"{i}.attention"))
        attention_params = [n for n, _ in layer.named_parameters() if "attention" in n]
        assert sorted(attention_params) == sorted(f"attention.{p}.{t}" for p in ("query", "key", "value", "out")
                                                  for t in ("weight", "bias"))
    fused = sampler(video, text, mask, grid_hw=(5, 5))
    nv, nt = fused.video.shape[1], fused.text.shape[1]
    for i in range(2):
        assert seen[f"{i}.ffn_video"] == [nv] and seen[f"{i}.ffn_text"] == [nt]
        assert seen[f"{i}.attention"] == [nv + nt]

    # A loss on the text slots alone gives the last layer's FFN_t gradient and its FFN_v none (and the reverse).
    last = sampler.layers[-1]
    for slots, own, other in (("text", last.ffn_text, last.ffn_video), ("video", last.ffn_video, last.ffn_text)):
        sampler.zero_grad(set_to_none=True)
        getattr(sampler(video, text, mask, grid_hw=(5, 5)), slots).square().sum().backward()
        assert own.fc1.weight.grad.abs().sum() > 0
        assert other.fc1.weight.grad is None or other.fc1.weight.grad.abs().sum() == 0
        assert last.attention.query.weight.grad.abs().sum() > 0


def test_guidance_gets_gradients_from_wq_zero():
    """W_q = 0 at init, but it receives gradient (text guidance is learnable from the start)."""
    sampler = make_sampler()
    sampler.train()
    video, text, mask = features(T=3, h=5, w=5)
    sampler(video, text, mask, grid_hw=(5, 5)).cls.square().sum().backward()
    assert sampler.guide_query.weight.grad.abs().sum() > 0


def test_flatten_fusion_shapes_and_padding():
    torch.manual_seed(0)
    flatten = FlattenFusion(SamplerConfig(layers=2, heads=2), D).eval()
    video, text, mask = features(T=3, h=5, w=5, L=7, valid=[7, 4])
    fused = flatten(video, text, mask)
    assert fused.video.shape == (2, 3 * 26, D) and fused.text.shape == (2, 7, D)
    padded = flatten(video, torch.cat([text, torch.randn(2, 3, D)], 1), torch.cat([mask, torch.zeros(2, 3, dtype=torch.bool)], 1))
    torch.testing.assert_close(padded.video, fused.video, rtol=0, atol=1e-5)
    torch.testing.assert_close(padded.text[:, :7][mask], fused.text[mask], rtol=0, atol=1e-5)


def test_memory_benchmark_smoke():
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "multi_memory.py"), "--smoke"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "| frames T | text L | video tokens | sampler peak MB | flatten peak MB |" in done.stdout
    # one row per smoke configuration, both fusions measured: frames 2, 3, 4 at L = 8, and L = 24 at 2 frames
    # (17 tokens per frame: [CLS] + 4 x 4 patches)
    rows = [line for line in done.stdout.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert [line.split(" | ")[:3] for line in rows[:4]] == [["| 2", "8", "34"], ["| 3", "8", "51"], ["| 4", "8", "68"],
                                                            ["| 2", "24", "34"]]
    assert all("skipped" not in line for line in rows[:4])
    assert "Linear-growth check" in done.stdout and "smoke run: claims reported, not enforced" in done.stdout
