"""MuLTI training on a tiny model: a step lowers the loss, resuming equals an unbroken run, MCM items right."""
import dataclasses
import json
import random

import pytest
import torch

from easyanimate.multi import data as D
from easyanimate.multi.train import (Batch, MultiTrainConfig, build, make_batch, make_optimizer, mcm_items,
                                     stage_losses, step_losses, train_multi, twin_index)

# A model far below multi-tiny (one layer each, width 32): the tests check the loop, not the quality.
TINY = {"vision": {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64,
                   "image_size": 32, "patch_size": 16, "num_channels": 3, "qkv_bias": True},
        "text": {"vocab_size": 64, "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                 "intermediate_size": 64, "max_position_embeddings": 64, "type_vocab_size": 2, "pad_token_id": 0,
                 "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0},
        "num_frames": 4, "max_frames": 8, "image_size": 32, "image_mean": [0.5] * 3, "image_std": [0.5] * 3,
        "max_text_len": 24, "embed_dim": 16, "mask_token_id": 4, "special_token_ids": [0, 1, 2, 3, 4],
        "sampler": {"layers": 1, "heads": 2, "ffn_mult": 2, "grid": [4, 1, 1], "guide_dim": 8}}


@pytest.fixture(scope="module")
def tiny_config_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("cfg") / "tiny.json"
    path.write_text(json.dumps(TINY))
    return str(path)


def tiny_cfg(out, config, **kw):
    base = dict(out=str(out), config=config, steps=3, finetune_steps=2, batch=4, clips=12, warmup=1, eval_clips=0,
                save_every=2, quiet=True, threads=1, dtype="fp32")
    base.update(kw)
    return MultiTrainConfig(**base)


def _data(cfg):
    specs = D.train_clips(cfg.clips, cfg.data_seed, frames=8, size=32)
    import numpy as np

    return np.stack([D.render(s, 8, 32) for s in specs]), specs


def test_mcm_items_true_caption_is_labelled_and_distractors_differ():
    specs = D.train_clips(8, seed=4)
    for mode in ("hard", "swap", "mixed"):
        batch = Batch(specs, None, torch.Generator().manual_seed(0), random.Random(0))
        sim = torch.randn(8, 8)
        questions, options, labels = mcm_items(batch, sim, mode)
        assert len(options) == 32 == len(questions) and len(labels) == 8
        for i, spec in enumerate(specs):
            opts = options[4 * i: 4 * i + 4]
            assert opts[labels[i]] == D.caption(spec) and len(set(opts)) == 4
            assert questions[4 * i] in D.MCM_QUESTIONS
            same_meaning = {D.caption(spec, template=t) for t in range(len(D.CAPTION_TEMPLATES))}
            assert not same_meaning & {o for j, o in enumerate(opts) if j != labels[i]}
        batch_captions = {D.caption(s) for s in specs}
        from_batch = sum(o in batch_captions for k, o in enumerate(options) if k % 4 != labels[k // 4])
        if mode == "hard":  # other clips' captions (a swapped caption only when the pool runs dry)
            assert from_batch >= 20
        if mode == "swap":  # the clip's own caption with one attribute changed
            assert from_batch <= 4

def test_training_steps_lower_the_loss(tiny_config_file, tmp_path):
    torch.manual_seed(0)
    cfg = tiny_cfg(tmp_path, tiny_config_file, lr=2e-3)
    model, tokenizer, config = build(cfg, tmp_path)
    data, specs = _data(cfg)
    optimizer = make_optimizer(model, cfg)
    for group in optimizer.param_groups:
        group["lr"] = cfg.lr
    losses = []
    for _ in range(15):  # the same batch (and masks, negatives, items) again and again: the loss must fall
        batch = make_batch(data, specs, config, cfg, step=0)
        terms = step_losses(model, tokenizer, config, batch, stage_losses("pretrain", cfg), cfg)
        loss = sum(v for k, v in terms.items() if not k.startswith("acc_"))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert set(terms) >= {"vtc", "vtm", "mlm", "mcm"}
    assert losses[-1] < 0.8 * losses[0], losses
    terms = step_losses(model, tokenizer, config, batch, stage_losses("finetune", cfg), cfg)
    assert set(terms) >= {"vtc", "vtm", "mcqa", "openqa", "tags"} and all(torch.isfinite(v) for v in terms.values())


def test_resume_gives_the_same_weights_as_an_unbroken_run(tiny_config_file, tmp_path):
    from easyanimate.multi.io import load_multi
    from easyanimate.train.common import read_loss_log

    data_dir = str(tmp_path / "data")
    straight = tiny_cfg(tmp_path / "a", tiny_config_file, data=data_dir)
    train_multi(straight)
    broken = tiny_cfg(tmp_path / "b", tiny_config_file, data=data_dir, stop_at=3)
    assert train_multi(broken) is None  # stopped inside the finetuning stage's schedule... before the end
    train_multi(dataclasses.replace(broken, stop_at=None))
    a = load_multi(tmp_path / "a" / "model").model.state_dict()
    b = load_multi(tmp_path / "b" / "model").model.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)
    log = read_loss_log(tmp_path / "b")
    assert [r["step"] for r in log] == [1, 2, 3, 4, 5]
    assert [r["stage"] for r in log] == ["pretrain"] * 3 + ["finetune"] * 2
    # the model folder has everything the nodes need
    bundle = load_multi(tmp_path / "a" / "model")
    assert bundle.tokenizer is not None and bundle.config.tags == list(D.TAGS)
    assert bundle.config.answers == list(D.ANSWERS)


def test_twin_batches_pair_clips_that_differ_in_one_attribute(tiny_config_file, tmp_path):
    cfg = tiny_cfg(tmp_path, tiny_config_file, twin_fraction=1.0, batch=16)
    _, _, config = build(cfg, tmp_path)
    import numpy as np

    specs = D.train_clips(3000, seed=4, frames=2, size=32)
    data = np.zeros((len(specs), 2, 32, 32, 3), np.uint8)
    twins = twin_index(specs)
    assert sum(map(len, twins.values())) == len(specs)
    batch = make_batch(data, specs, config, cfg, step=3, twins=twins)
    assert batch.frames.shape[:2] == (16, config.num_frames)
    attrs = [tuple(getattr(s, a) for a in D.ATTRIBUTES) for s in batch.specs]
    differing = [sum(x != y for x, y in zip(a, b)) for i, a in enumerate(attrs) for b in attrs[i + 1:]]
    assert differing.count(1) >= 6  # 8 pairs asked for; a clip with no partner in the data keeps a random one
    assert make_batch(data, specs, config, cfg, step=3, twins=twins).specs == batch.specs  # deterministic
    plain = make_batch(data, specs, config, tiny_cfg(tmp_path, tiny_config_file, batch=16), step=3)
    plain_attrs = [tuple(getattr(s, a) for a in D.ATTRIBUTES) for s in plain.specs]
    assert sum(sum(x != y for x, y in zip(a, b)) == 1
               for i, a in enumerate(plain_attrs) for b in plain_attrs[i + 1:]) < differing.count(1)


def test_motion_run_starts_the_video_encoder_of_a_fresh_model(tiny_config_file, tmp_path):
    from easyanimate.errors import CheckpointMismatchError
    from easyanimate.multi.io import load_multi

    motion = tiny_cfg(tmp_path / "motion", tiny_config_file, task="motion", steps=2)
    assert stage_losses("motion", motion) == ("motion",)
    folder = train_multi(motion)
    log = [json.loads(line) for line in (tmp_path / "motion" / "loss.jsonl").read_text().splitlines()]
    assert [row["stage"] for row in log] == ["motion"] * 2 and all(row["motion"] > 0 for row in log)
    trained = load_multi(folder).model.float().state_dict()
    main = tiny_cfg(tmp_path / "main", tiny_config_file, init_vision=str(folder), data=str(tmp_path / "motion" / "data"))
    torch.manual_seed(0)
    model, _, _ = build(main, tmp_path / "main")
    torch.manual_seed(0)
    fresh, _, _ = build(tiny_cfg(tmp_path / "fresh", tiny_config_file), tmp_path / "fresh")
    for name, tensor in model.state_dict().items():
        if name.startswith(("vision_encoder.", "temporal_embed")):
            assert torch.equal(tensor, trained[name]), name
        elif name.startswith("fusion.layers.0.attention"):  # the rest starts fresh
            assert torch.equal(tensor, fresh.state_dict()[name]), name
    other = dict(TINY, vision={**TINY["vision"], "intermediate_size": 32})
    other_file = tmp_path / "other.json"
    other_file.write_text(json.dumps(other))
    with pytest.raises(CheckpointMismatchError, match="video encoder differs"):
        build(tiny_cfg(tmp_path / "bad", str(other_file), init_vision=str(folder)), tmp_path / "bad")
    with pytest.raises(ValueError, match="not both"):
        train_multi(dataclasses.replace(main, init=str(folder)))
