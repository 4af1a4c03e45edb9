"""save_multi / load_multi: round trips (bit-exact in fp32, close in fp16), tokenizer files, and errors
that name what is wrong (missing / unexpected keys, wrong shapes, damaged files, missing files)."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from easyanimate.errors import CheckpointMismatchError, CorruptCheckpointError, LayoutError
from easyanimate.multi.io import load_multi, save_multi
from easyanimate.multi.model import MuLTI

from . import text_batch, tiny_config


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return MuLTI(tiny_config(vision_backbone="vit")).eval()


def outputs(model):
    frames = torch.randn(2, 3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    ids, mask = text_batch(2, 8, valid=[8, 5])
    with torch.no_grad():
        video, text = model.encode_video(frames), model.encode_text(ids, mask)
        fused = model.fuse(video, text, mask)
        long = model.fuse(video, text, mask, condense_text=False)
        return {"vtc": model.video_embedding(video) @ model.text_embedding(text).T, "vtm": model.vtm_logits(fused),
                "mcm": model.mcm_logits(fused), "qa": model.qa_logits(fused), "tags": model.tag_logits(fused),
                "mlm": model.mlm_logits(long)}


def test_round_trip_fp32_is_bit_exact(model, tmp_path):
    save_multi(tmp_path, model, dtype=torch.float32)
    bundle = load_multi(tmp_path)
    assert bundle.config == model.config and bundle.tokenizer is None and not bundle.model.training
    for name, tensor in model.state_dict().items():
        assert torch.equal(bundle.model.state_dict()[name], tensor), name
    for name, value in outputs(model).items():
        assert torch.equal(outputs(bundle.model)[name], value), name


def test_round_trip_fp16_is_close(model, tmp_path):
    save_multi(tmp_path, model)  # fp16 by default
    assert all(t.dtype == torch.float16 for t in load_file(tmp_path / "model.safetensors").values() if t.is_floating_point())
    ours = outputs(model)
    for dtype in ("fp32", torch.float16):
        bundle = load_multi(tmp_path, dtype=dtype)
        assert next(bundle.model.parameters()).dtype == (torch.float32 if dtype == "fp32" else torch.float16)
        theirs = outputs(bundle.model.float())
        for name, value in ours.items():
            torch.testing.assert_close(theirs[name], value, rtol=0, atol=2e-2 * max(1.0, value.abs().max().item()))


def test_encoders_are_stored_in_hub_layout(model, tmp_path):
    """Encoder tensors keep the Hugging Face Hub names, whatever names the installed transformers uses."""
    save_multi(tmp_path, model)
    names = set(load_file(tmp_path / "model.safetensors"))
    assert "vision_encoder.encoder.layer.0.attention.attention.query.weight" in names
    assert "text_encoder.encoder.layer.0.attention.self.query.weight" in names
    assert len(names) == len(model.state_dict())


def test_tokenizer_files_round_trip(model, tmp_path):
    from easyanimate.multi.tokenizer import build_tokenizer

    tokenizer = build_tokenizer(["a red circle"])
    save_multi(tmp_path, model, tokenizer)
    bundle = load_multi(tmp_path)
    assert bundle.tokenizer is not None
    assert bundle.tokenizer("a red circle")["input_ids"] == tokenizer("a red circle")["input_ids"] == [2, 5, 6, 7, 3]


def test_missing_and_unexpected_keys_are_named(model, tmp_path):
    save_multi(tmp_path, model)
    weights = tmp_path / "model.safetensors"
    state = load_file(weights)
    state.pop("vtm_head.weight")
    state["extra_head.weight"] = torch.zeros(2)
    save_file(state, weights)
    with pytest.raises(CheckpointMismatchError) as err:
        load_multi(tmp_path)
    assert "vtm_head.weight" in str(err.value) and "extra_head.weight" in str(err.value)


def test_wrong_shapes_are_named(model, tmp_path):
    save_multi(tmp_path, model)
    config = json.loads((tmp_path / "config.json").read_text())
    config["tags"] = config["tags"] + ["extra"]  # tag head of another size
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointMismatchError, match="tag_head"):
        load_multi(tmp_path)


def test_damaged_files(model, tmp_path):
    save_multi(tmp_path, model)
    weights = tmp_path / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])  # truncated download
    with pytest.raises(CorruptCheckpointError, match="damaged or truncated"):
        load_multi(tmp_path)
    weights.write_bytes(b"\x80\x04not a safetensors file at all")  # e.g. a pickle renamed
    with pytest.raises(CorruptCheckpointError):
        load_multi(tmp_path)


def test_missing_files(model, tmp_path):
    with pytest.raises(LayoutError, match="config.json"):
        load_multi(tmp_path)
    save_multi(tmp_path, model)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(LayoutError, match="model.safetensors"):
        load_multi(tmp_path)


def test_files_without_hub_layout_still_load(model, tmp_path):
    """A file written with the installed transformers' own tensor names (no Hub renaming) loads too."""
    save_multi(tmp_path, model, dtype=torch.float32)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp_path / "model.safetensors")
    bundle = load_multi(tmp_path)
    assert torch.equal(outputs(bundle.model)["vtm"], outputs(model)["vtm"])


@pytest.mark.parametrize("attention", ["frame", "joint"])
def test_round_trip_with_the_motion_options(attention, tmp_path):
    torch.manual_seed(0)
    model = MuLTI(tiny_config(position_init="sincos", temporal_layers=1, frame_context=1,
                              video_attention=attention)).eval()
    save_multi(tmp_path, model, dtype=torch.float32)
    bundle = load_multi(tmp_path)
    assert bundle.config == model.config
    expected, got = outputs(model), outputs(bundle.model)
    for name in expected:
        assert torch.equal(expected[name], got[name]), name
    half = load_multi(tmp_path, dtype=torch.float16)  # the temporal layer's eval fast path in half precision
    for name, value in outputs(half.model).items():
        torch.testing.assert_close(value.float(), expected[name], atol=0.05, rtol=0.05)
