"""MuLTI model (docs/numerics.md#multi): encoders, heads, adapter, checkpoint initialisation,
config and preprocessing."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from easyanimate.errors import CheckpointMismatchError, EasyAnimateError
from easyanimate.multi.config import MuLTIConfig, load_config
from easyanimate.multi.model import MuLTI, sincos_table
from easyanimate.multi.preprocess import prepare_frames, sample_frame_indices

from . import text_batch, tiny_config


def build(**overrides) -> MuLTI:
    torch.manual_seed(0)
    return MuLTI(tiny_config(**overrides)).eval()


def frames(B=2, T=4, size=32, seed=0):
    return torch.randn(B, T, 3, size, size, generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------------------------------
# encoders, shapes
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("T", [1, 3, 4, 8, 20])
def test_shapes_any_frame_count(T):
    model = build()
    ids, mask = text_batch(2, 9, valid=[9, 5])
    video, text = model.encode_video(frames(T=T)), model.encode_text(ids, mask)
    assert video.shape == (2, T, 17, 32) and text.shape == (2, 9, 32)
    fused = model.fuse(video, text, mask)
    assert fused.video.shape == (2, 1 + min(T, 4) * 4, 32) and fused.text.shape == (2, 9, 32)
    assert model.vtm_logits(fused).shape == (2, 2)
    assert model.mcm_logits(fused).shape == (2,)
    assert model.qa_logits(fused).shape == (2, 5)
    assert model.tag_logits(fused).shape == (2, 3)
    assert model.mlm_logits(fused).shape == (2, 9, 64)
    assert model.video_embedding(video).shape == (2, 16) and model.text_embedding(text).shape == (2, 16)


def test_odd_patch_grid_and_long_clips():
    model = build(image_size=40)  # 5x5 patches of 8 px
    video = model.encode_video(frames(T=40, size=40))  # 40 > max_frames (32): temporal table stretched
    assert video.shape == (2, 40, 26, 32)
    ids, mask = text_batch(2, 6)
    assert model.fuse(video, model.encode_text(ids, mask), mask).video.shape == (2, 17, 32)


def test_temporal_embedding_added_per_frame():
    model = build()
    still = frames(B=1, T=1).expand(1, 3, -1, -1, -1)  # the same frame three times
    video = model.encode_video(still)
    table = model.temporal_embed
    torch.testing.assert_close(video[0, 1] - video[0, 0], (table[1] - table[0]).expand(17, -1), atol=1e-5, rtol=0)


def test_sincos_table_rows_are_distinct_and_factorised():
    table = sincos_table((3, 2, 2), 30)  # 30 channels over 3 axes: shares 10, 10, 10
    assert table.shape == (12, 30) and table.abs().max() <= 1
    assert torch.cdist(table, table).fill_diagonal_(1).min() > 0.1  # every (t, y, x) its own row
    rows = table.view(3, 2, 2, 30)
    torch.testing.assert_close(rows[:, 0, 0, :10], rows[:, 1, 1, :10])  # the t share ignores y and x
    torch.testing.assert_close(rows[0, :, 0, 10:20], rows[2, :, 1, 10:20])  # the y share ignores t and x
    time_only = sincos_table((5,), 8)
    angles = torch.arange(5.0)[:, None] / 10000 ** (torch.arange(4.0) / 4)
    torch.testing.assert_close(time_only, torch.cat([angles.sin(), angles.cos()], 1))
    assert sincos_table((4,), 7).shape == (4, 7)


@pytest.mark.parametrize("backbone", ["vit", "clip"])
def test_sincos_position_init(backbone):
    model = build(position_init="sincos", vision_backbone=backbone)
    config = model.config
    if backbone == "clip":
        positions = model._clip_tower().embeddings.position_embedding.weight
    else:
        positions = model.vision_encoder.embeddings.position_embeddings[0]
    assert torch.equal(positions[0], torch.zeros(32))
    torch.testing.assert_close(positions[1:], sincos_table(config.patch_grid, 32))
    torch.testing.assert_close(model.temporal_embed, sincos_table((config.max_frames,), 32))
    torch.testing.assert_close(model.fusion.slot_embed[1:], sincos_table(config.sampler.grid, 32))
    assert torch.equal(model.fusion.slot_embed[0], torch.zeros(32))
    # the default keeps the encoders' own small init
    assert build().temporal_embed.std() < 0.05


def test_temporal_layers_make_the_video_embedding_see_frame_order():
    clip = frames(B=1, T=4)
    reversed_clip = clip.flip(1)
    plain = build(position_init="sincos")
    emb = plain.video_embedding(plain.encode_video(clip))
    # without temporal layers the VTC embedding is a mean over frames: blind to their order...
    torch.testing.assert_close(emb, plain.video_embedding(plain.encode_video(reversed_clip)), atol=1e-5, rtol=0)
    model = build(position_init="sincos", temporal_layers=1)
    video = model.encode_video(clip)
    # ...with them, it is not; the patch tokens are the same as without the layer
    assert (model.video_embedding(video) - model.video_embedding(model.encode_video(reversed_clip))).abs().max() > 1e-3
    model.temporal_encoder = None
    untouched = model.encode_video(clip)
    torch.testing.assert_close(video[:, :, 1:], untouched[:, :, 1:])
    assert not torch.allclose(video[:, :, 0], untouched[:, :, 0])
    ids, mask = text_batch(1, 6)
    assert model.fuse(video, model.encode_text(ids, mask), mask).video.shape == (1, 17, 32)


@pytest.mark.parametrize("backbone", ["vit", "clip"])
def test_joint_attention_runs_the_vit_over_all_frames_at_once(backbone):
    from easyanimate.multi.model import _layer_list

    model = build(video_attention="joint", vision_backbone=backbone)
    clip = frames(T=3)
    video = model.encode_video(clip)
    # reference: the encoder's own modules, called by hand on one sequence per clip
    with torch.no_grad():
        if backbone == "clip":
            tower = model._clip_tower()
            hidden, final_norm = tower.pre_layrnorm(tower.embeddings(clip.flatten(0, 1))), tower.post_layernorm
        else:
            hidden, final_norm = model.vision_encoder.embeddings(clip.flatten(0, 1)), model.vision_encoder.layernorm
        hidden = (hidden.view(2, 3, 17, 32) + model.temporal_embedding(3)[None, :, None]).flatten(1, 2)
        for layer in _layer_list(model._clip_tower() if backbone == "clip" else model.vision_encoder):
            out = layer(hidden, None) if backbone == "clip" else layer(hidden)
            hidden = out[0] if isinstance(out, tuple) else out
        expected = final_norm(hidden).view(2, 3, 17, 32) + model.temporal_embedding(3)[None, :, None]
    torch.testing.assert_close(video, expected, atol=1e-5, rtol=1e-5)
    changed = clip.clone()
    changed[:, 2] += 1
    assert (model.encode_video(changed)[:, 0] - video[:, 0]).abs().max() > 1e-3  # frame 0 sees frame 2
    frame_model = build(vision_backbone=backbone)
    assert torch.equal(frame_model.encode_video(changed)[:, 0], frame_model.encode_video(clip)[:, 0])


def test_frame_context_reads_neighbours_and_inflates_single_frame_checkpoints(tmp_path):
    from transformers import ViTConfig, ViTModel

    model, plain = build(frame_context=1), build()
    weight = model.vision_encoder.embeddings.patch_embeddings.projection.weight
    assert weight.shape[1] == 9 and model.config.vision_channels == 9
    clip = frames(T=4)
    changed = clip.clone()
    changed[:, 1] += 1
    video = model.encode_video(clip)
    delta = (model.encode_video(changed) - video).abs().amax((0, 2, 3))
    assert delta[0] > 1e-3 and delta[2] > 1e-3 and delta[3] == 0  # frames 0 and 2 see frame 1, frame 3 does not
    source = ViTModel(ViTConfig(**{**plain.config.vision, "image_size": 32}), add_pooling_layer=False)
    source.save_pretrained(tmp_path)
    report = model.init_vision_from(tmp_path)
    assert not report.missing
    plain.init_vision_from(tmp_path)
    with torch.no_grad():
        model.temporal_embed.copy_(plain.temporal_embed)
    # centre inflation: the model starts as the checkpoint's per-frame ViT
    torch.testing.assert_close(model.encode_video(clip), plain.encode_video(clip), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(weight[:, 3:6], source.embeddings.patch_embeddings.projection.weight, rtol=0, atol=0)
    assert not weight[:, :3].any() and not weight[:, 6:].any()


def test_clip_backbone():
    model = build(vision_backbone="clip", vision={"hidden_act": "quick_gelu", "layer_norm_eps": 1e-5})
    video = model.encode_video(frames(T=2))
    assert video.shape == (2, 2, 17, 32)
    # tokens leave through CLIP's final LayerNorm (zero mean per token, before the temporal embedding)
    centred = (video - model.temporal_embedding(2)[None, :, None]).mean(-1)
    assert centred.abs().max() < 1e-4 + model._clip_tower().post_layernorm.bias.abs().max()


def test_vtc_embeddings_and_temperature():
    model = build()
    ids, mask = text_batch(3, 6)
    v = model.video_embedding(model.encode_video(frames(B=3)))
    t = model.text_embedding(model.encode_text(ids, mask))
    torch.testing.assert_close(v.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(t.norm(dim=-1), torch.ones(3))
    assert model.temperature.item() == pytest.approx(0.07)
    with torch.no_grad():
        model.temp.fill_(5.0)
    assert model.temperature.item() == pytest.approx(0.5)


def test_mlm_decoder_is_tied_to_word_embeddings():
    model = build()
    ids, mask = text_batch(2, 6)
    fused = model.fuse(model.encode_video(frames()), model.encode_text(ids, mask), mask, condense_text=False)
    head = model.mlm_head
    expected = F.linear(head.norm(F.gelu(head.dense(fused.text))), model.text_encoder.embeddings.word_embeddings.weight, head.bias)
    torch.testing.assert_close(model.mlm_logits(fused), expected)
    assert not any("decoder" in name for name in model.state_dict())  # one copy of the embedding table


def test_tag_head_reads_cls_and_mean_video():
    model = build()
    ids, mask = text_batch(2, 6)
    fused = model.fuse(model.encode_video(frames()), model.encode_text(ids, mask), mask)
    expected = model.tag_head(torch.cat([fused.cls, fused.video.mean(1)], -1))
    torch.testing.assert_close(model.tag_logits(fused), expected)


def test_missing_heads_raise():
    model = build(tags=[], answers=[])
    ids, mask = text_batch(1, 4)
    fused = model.fuse(model.encode_video(frames(B=1)), model.encode_text(ids, mask), mask)
    with pytest.raises(ValueError, match="answer"):
        model.qa_logits(fused)
    with pytest.raises(ValueError, match="tags"):
        model.tag_logits(fused)


def test_text_padding_changes_no_output():
    """Padding appended to the text (ids with mask 0) changes none of the heads' outputs."""
    model = build()
    video = model.encode_video(frames())
    ids, mask = text_batch(2, 8, valid=[8, 5])
    padded_ids = torch.cat([ids, torch.randint(5, 64, (2, 12))], 1)  # 20 > text_keep_max: condensation path
    padded_mask = torch.cat([mask, torch.zeros(2, 12, dtype=torch.long)], 1)
    outputs = []
    for i, m in ((ids, mask), (padded_ids, padded_mask)):
        text = model.encode_text(i, m)
        fused = model.fuse(video, text, m)
        outputs.append([model.text_embedding(text), model.vtm_logits(fused), model.mcm_logits(fused),
                        model.qa_logits(fused), model.tag_logits(fused)])
    for a, b in zip(*outputs):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-5)


def test_flatten_fusion_model():
    model = build(sampler={"fusion": "flatten"})
    ids, mask = text_batch(2, 6)
    fused = model.fuse(model.encode_video(frames(T=3)), model.encode_text(ids, mask), mask)
    assert fused.video.shape == (2, 3 * 17, 32)
    assert model.vtm_logits(fused).shape == (2, 2) and model.tag_logits(fused).shape == (2, 3)


# --------------------------------------------------------------------------------------------------
# adapter (v1)
# --------------------------------------------------------------------------------------------------


def adapter_model(scope="frame"):
    torch.manual_seed(0)
    plain = MuLTI(tiny_config()).eval()
    adapted = MuLTI(tiny_config(adapter={"enable": True, "video_scope": scope})).eval()
    missing, unexpected = adapted.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and all(k.split(".")[0] in ("vision_adapter", "text_adapter") for k in missing)
    return plain, adapted


@pytest.mark.parametrize("scope", ["frame", "clip"])
def test_adapter_starts_as_identity(scope):
    plain, adapted = adapter_model(scope)
    ids, mask = text_batch(2, 7, valid=[7, 3])
    torch.testing.assert_close(adapted.encode_video(frames(T=3)), plain.encode_video(frames(T=3)), rtol=0, atol=0)
    torch.testing.assert_close(adapted.encode_text(ids, mask), plain.encode_text(ids, mask), rtol=0, atol=0)


@pytest.mark.parametrize("scope", ["frame", "clip"])
def test_adapter_frozen_layers_get_no_grads(scope):
    _, model = adapter_model(scope)
    model.train()
    torch.nn.init.normal_(model.vision_adapter.attention_out.weight, std=0.1)  # leave the identity point
    ids, mask = text_batch(2, 7, valid=[7, 3])
    video, text = model.encode_video(frames(T=3)), model.encode_text(ids, mask)
    fused = model.fuse(video, text, mask)
    (model.vtm_logits(fused).sum() + model.video_embedding(video).sum() + model.text_embedding(text).sum()).backward()
    for encoder, frozen_prefixes, trained in (
        (model.vision_encoder, ("embeddings.", "encoder.layer.0."), "encoder.layer.1."),
        (model.text_encoder, ("embeddings.", "encoder.layer.0."), "encoder.layer.1."),
    ):
        for name, param in encoder.named_parameters():
            if name.startswith(frozen_prefixes):
                assert not param.requires_grad and param.grad is None, name
            elif name.startswith(trained) and "weight" in name:
                assert param.grad is not None, name
    for adapter in (model.vision_adapter, model.text_adapter):
        assert adapter.qkv.weight.grad is not None and adapter.attention_out.weight.grad.abs().sum() > 0


def test_adapter_frozen_layers_keep_no_activations():
    """Freezing the shallow layers means autograd saves fewer tensors for the backward pass."""
    plain, adapted = adapter_model()

    def saved(model):
        count = [0]

        def pack(t):
            count[0] += t.numel()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model.video_embedding(model.encode_video(frames(T=3))).sum()
        return count[0]

    assert saved(adapted) < 0.8 * saved(plain)


# --------------------------------------------------------------------------------------------------
# initialisation from public checkpoints (HF layouts, written here by transformers with random weights)
# --------------------------------------------------------------------------------------------------


def test_init_vision_from_vit_folder(tmp_path):
    from transformers import ViTConfig, ViTModel

    model = build()
    source = ViTModel(ViTConfig(**{**model.config.vision, "image_size": 32}))  # with pooler, as HF ships ViT
    source.save_pretrained(tmp_path)
    report = model.init_vision_from(tmp_path)
    assert not report.missing and all(k.startswith("pooler.") for k in report.unexpected) and report.unexpected
    for name, tensor in model.vision_encoder.state_dict().items():
        torch.testing.assert_close(tensor, source.state_dict()[name], rtol=0, atol=0)
    assert "loaded" in str(report)


def test_init_vision_from_prefixed_state_dict_and_shape_errors():
    from transformers import ViTConfig, ViTModel

    model = build()
    source = ViTModel(ViTConfig(**{**model.config.vision, "image_size": 32}), add_pooling_layer=False).state_dict()
    state = {f"vit.{k}": v for k, v in source.items()} | {"classifier.weight": torch.zeros(10, 32)}
    report = model.init_vision_from(state)
    assert not report.missing and report.unexpected == ["classifier.weight"]
    bad = dict(state)
    bad["vit.embeddings.position_embeddings"] = torch.zeros(1, 50, 32)
    with pytest.raises(CheckpointMismatchError, match="position_embeddings"):
        model.init_vision_from(bad)
    with pytest.raises(CheckpointMismatchError, match="no tensor"):
        model.init_vision_from({"foo.weight": torch.zeros(2)})


def test_init_vision_from_full_clip_checkpoint(tmp_path):
    from transformers import CLIPConfig, CLIPModel

    model = build(vision_backbone="clip", vision={"hidden_act": "quick_gelu", "layer_norm_eps": 1e-5})
    vision = {k: v for k, v in model.config.vision.items() if k not in ("hidden_dropout_prob", "attention_probs_dropout_prob")}
    clip = CLIPModel(CLIPConfig(vision_config={**vision, "image_size": 32},
                                text_config={"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                                             "intermediate_size": 64, "vocab_size": 50}, projection_dim=16))
    clip.save_pretrained(tmp_path)
    report = model.init_vision_from(tmp_path / "model.safetensors")
    assert not report.missing
    assert any(k.startswith("text_model.") for k in report.unexpected)
    torch.testing.assert_close(model._clip_tower().post_layernorm.weight,
                               clip.vision_model.post_layernorm.weight, rtol=0, atol=0)


def test_init_text_from_bert_pretraining_checkpoint(tmp_path):
    from transformers import BertConfig, BertForPreTraining

    model = build(sampler={"ffn_mult": 2})  # sampler FFN width = BERT intermediate_size (64)
    source = BertForPreTraining(BertConfig(**model.config.text))
    with torch.no_grad():
        source.cls.predictions.bias.normal_()
    source.save_pretrained(tmp_path)
    report = model.init_text_from(tmp_path)
    assert not report.missing
    assert {"mlm_head.dense.weight", "mlm_head.norm.weight", "mlm_head.bias"} <= set(report.loaded)
    assert all(k.startswith(("cls.seq_relationship", "bert.pooler", "cls.predictions.decoder")) for k in report.unexpected)
    torch.testing.assert_close(model.mlm_head.bias, source.cls.predictions.bias, rtol=0, atol=0)
    torch.testing.assert_close(model.word_embeddings, source.bert.embeddings.word_embeddings.weight, rtol=0, atol=0)
    # TF-era names (LayerNorm.gamma / beta) are understood too
    state = {k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
             for k, v in source.state_dict().items()}
    assert not build().init_text_from(state).missing
    # and the sampler can start from BERT layers
    assert model.init_sampler_from_text("last") == 2
    torch.testing.assert_close(model.fusion.layers[0].ffn_text.fc1.weight, source.bert.encoder.layer[0].intermediate.dense.weight)


# --------------------------------------------------------------------------------------------------
# config, import cost, preprocessing
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["multi-tiny", "multi-base"])
def test_presets_round_trip(name, tmp_path):
    config = load_config(name)
    again = MuLTIConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert again == config
    config.save(tmp_path / "c.json")
    assert load_config(tmp_path / "c.json") == config
    assert load_config(tmp_path) == config if (tmp_path / "config.json").exists() else True


def test_tiny_preset_sizes():
    config = load_config("multi-tiny")
    assert config.patch_grid == (4, 4) and config.num_frames == 8 and config.hidden_size == 128
    assert config.sampler.layers == 2 and config.sampler.grid == (8, 2, 2)


def test_config_errors():
    with pytest.raises(EasyAnimateError, match="unknown keys"):
        MuLTIConfig.from_dict({"sampler": {"layerz": 2}})
    with pytest.raises(EasyAnimateError, match="residual_mode"):
        tiny_config(sampler={"residual_mode": "nope"})
    with pytest.raises(EasyAnimateError, match="hidden_size"):
        tiny_config(vision={"hidden_size": 48})
    with pytest.raises(EasyAnimateError, match="multi-tiny"):
        load_config("no-such-preset")
    with pytest.raises(EasyAnimateError, match="position_init"):
        tiny_config(position_init="learned")
    with pytest.raises(EasyAnimateError, match="temporal_layers"):
        tiny_config(temporal_layers=-1)
    with pytest.raises(EasyAnimateError, match="video_attention"):
        tiny_config(video_attention="divided")
    with pytest.raises(EasyAnimateError, match="frame_context"):
        tiny_config(frame_context=-1)


def test_import_is_cheap():
    code = ("import sys, easyanimate.multi, easyanimate.multi.model, easyanimate.multi.io, easyanimate.multi.losses;"
            "print('transformers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_sample_frame_indices():
    assert sample_frame_indices(16, 4) == [1, 5, 9, 13]
    assert sample_frame_indices(3, 6) == [0, 0, 1, 1, 2, 2]  # short clips repeat frames
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        picked = sample_frame_indices(20, 4, train=True, generator=g)
        assert all(5 * i <= p < 5 * (i + 1) for i, p in enumerate(picked))
    with pytest.raises(ValueError):
        sample_frame_indices(0, 4)


def test_prepare_frames():
    config = tiny_config()
    video = torch.full((10, 48, 64, 3), 0.5)
    video[:, :, :8] = 1.0  # left edge: cropped away by the centre crop
    out = prepare_frames(video, config)
    assert out.shape == (1, 4, 3, 32, 32) and out.dtype == torch.float32
    torch.testing.assert_close(out, torch.zeros_like(out))  # 0.5 normalised with mean 0.5
    batch = prepare_frames(torch.rand(2, 5, 20, 20, 3).numpy(), config, train=True, generator=torch.Generator().manual_seed(1))
    assert batch.shape == (2, 4, 3, 32, 32)
    assert prepare_frames(torch.rand(5, 32, 32, 3), config, num_frames=7).shape == (1, 7, 3, 32, 32)
    as_bytes = prepare_frames(torch.full((4, 32, 32, 3), 255, dtype=torch.uint8), config)
    torch.testing.assert_close(as_bytes, torch.ones_like(as_bytes))  # (1 - 0.5) / 0.5
    with pytest.raises(ValueError):
        prepare_frames(torch.rand(5, 32, 32), config)
