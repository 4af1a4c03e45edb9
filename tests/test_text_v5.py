"""V5.1 (Qwen2-VL) and V5 (Bert + mT5) text encoding: loading, dtypes, fp8, errors, cache, estimates.

Every release folder is built here in tmp folders in the released layouts: a tiny Qwen2-VL (release-era
flat config.json, release key names `model.*` / `visual.*` / `lm_head.weight`, sharded with an index)
with a byte-level BPE tokenizer whose chat template is in chat_template.json as in the releases, and a
tiny Bert (WordPiece vocab.txt) + mT5 encoder (sentencepiece model from tests/release.py). Our encodings
are compared with transformers' own models run directly on the same weights: for Qwen2-VL the full
`Qwen2VLForConditionalGeneration` with `output_hidden_states=True` (`hidden_states[-2]`), for V5
`BertModel` and `T5EncoderModel` on the token ids without a mask. (The reference fixture itself is
checked in tests/parity/test_v5_text_parity.py.)
"""
from __future__ import annotations

import copy
import json
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import rel_error
from release_v5 import (
    BERT_VOCAB, CHAT_TEMPLATE, QWEN_MAX_LENGTH, QWEN_SPECIAL, qwen_config as _qwen_config, qwen_tokenizer as _qwen_tokenizer,
    randomize as _randomize, release_keys as _release_keys, write_bert_mt5_release_parts, write_qwen_release_parts,
    write_sharded as _write_sharded,
)
from easyanimate import text_v5
from easyanimate.errors import CheckpointMismatchError, EasyAnimateError, LayoutError
from easyanimate.text_v5 import BertMT5TextEncoder, Qwen2VLTextEncoder, V5TextEmbeddings, load_text_encoder_v5

PROMPTS = ["A cat walks in the snow, cinematic.", "一只猫在雪中行走", ""]
LONG_PROMPT = "a very long prompt " * 8  # longer than QWEN_MAX_LENGTH with the template

# --------------------------------------------------------------------------------------------------
# Tiny releases in the real layouts
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    """(release folder, transformers' Qwen2VLForConditionalGeneration with the same weights, tokenizer)."""
    root = tmp_path_factory.mktemp("v51")
    _, tokenizer, model = write_qwen_release_parts(root)
    return root, model, tokenizer


def _qwen_reference(model, tokenizer, prompts, max_length=QWEN_MAX_LENGTH):
    """What the reference computes: chat template per prompt, padded/truncated on the right, hidden_states[-2]."""
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": [{"type": "text", "text": p}]}],
                                           tokenize=False, add_generation_prompt=True) for p in prompts]
    inputs = tokenizer(texts, padding="max_length", max_length=max_length, truncation=True, padding_side="right",
                       return_tensors="pt")
    with torch.no_grad():
        hidden = model(input_ids=inputs.input_ids, attention_mask=inputs.attention_mask,
                       output_hidden_states=True).hidden_states[-2]
    return hidden, inputs.input_ids, inputs.attention_mask


@pytest.fixture(scope="module")
def v5(tmp_path_factory):
    """(release folder, transformers' BertModel, transformers' T5EncoderModel) with the same weights."""
    root = tmp_path_factory.mktemp("v5")
    bert, t5 = write_bert_mt5_release_parts(root)
    return root, bert, t5


def _bert_reference_ids(root, prompts, max_length=77):
    from transformers.models.bert.tokenization_bert_legacy import BertTokenizerLegacy

    tokenizer = BertTokenizerLegacy.from_pretrained(str(root / "tokenizer"))
    return tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt")


# --------------------------------------------------------------------------------------------------
# V5.1: Qwen2-VL
# --------------------------------------------------------------------------------------------------


def test_qwen_release_matches_transformers(qwen):
    root, model, tokenizer = qwen
    encoder = load_text_encoder_v5(root, dtype="fp32")
    assert isinstance(encoder, Qwen2VLTextEncoder) and encoder.max_length == QWEN_MAX_LENGTH
    reference, ids, mask = _qwen_reference(model, tokenizer, PROMPTS + [LONG_PROMPT])
    ours_ids, ours_mask = encoder.tokenize(PROMPTS + [LONG_PROMPT])
    assert torch.equal(ours_ids, ids) and torch.equal(ours_mask, mask)
    assert mask[-1].all() and not mask[0].all()  # the long prompt is truncated, the others are padded
    assert encoder.chat_text("hi") == "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n" \
                                      "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    text = encoder.encode(PROMPTS + [LONG_PROMPT], "blurry, low quality")
    assert text.embeds.shape == (4, QWEN_MAX_LENGTH, 32) and text.embeds.dtype == torch.float32
    assert torch.equal(text.mask, mask)
    assert rel_error(text.embeds, reference) < 1e-5  # padding positions included
    negative, _, negative_mask = _qwen_reference(model, tokenizer, ["blurry, low quality"] * 4)
    assert rel_error(text.negative_embeds, negative) < 1e-5 and torch.equal(text.negative_mask, negative_mask)
    # Not the final-normed output: hidden_states[-2] is the input of the last decoder layer.
    with torch.no_grad():
        final = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-1]
    assert rel_error(text.embeds, final) > 1e-2


def test_qwen_own_max_length_and_positions(qwen):
    root, model, tokenizer = qwen
    encoder = load_text_encoder_v5(root, dtype="fp32")
    reference, _, _ = _qwen_reference(model, tokenizer, PROMPTS[:1], max_length=128)
    embeds, mask = encoder.encode_prompts(PROMPTS[0], max_length=128)
    assert embeds.shape[1] == 128 and rel_error(embeds, reference) < 1e-5
    # Positions arange(L) for every token, padding included (what transformers 5 does for text-only input).
    valid = int(mask.sum())
    positions = torch.arange(128).view(1, 1, -1).expand(3, 1, -1)
    with torch.no_grad():
        explicit = model.model.language_model(input_ids=encoder.tokenize(PROMPTS[0], 128)[0], attention_mask=mask,
                                              position_ids=positions, output_hidden_states=True).hidden_states[-2]
    assert rel_error(embeds, explicit) < 1e-5 and valid < 128


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_qwen_half_precision(qwen, dtype):
    """As the reference loads it: transformers' `from_pretrained(..., dtype=dtype)` on the release folder."""
    from transformers import Qwen2VLForConditionalGeneration

    root, _, tokenizer = qwen
    encoder = load_text_encoder_v5(root, dtype=dtype)
    assert {p.dtype for p in encoder.model.parameters()} == {dtype}
    assert encoder.model.rotary_emb.inv_freq.dtype == torch.float32  # computed, not stored: stays float32
    model = Qwen2VLForConditionalGeneration.from_pretrained(str(root / "text_encoder"), dtype=dtype).eval()
    reference, _, _ = _qwen_reference(model, tokenizer, PROMPTS)
    embeds, _ = encoder.encode_prompts(PROMPTS)
    assert embeds.dtype == dtype
    assert rel_error(embeds, reference) < 1e-3  # equal here; one bf16 rounding step would be about 4e-3


def _dequantized(model, encoder):
    """transformers' model with every linear weight replaced by what our fp8 layer computes with."""
    from easyanimate.memory import Fp8Linear

    reference = copy.deepcopy(model)
    state = reference.state_dict()
    converted = 0
    for name, module in encoder.model.named_modules():
        if isinstance(module, Fp8Linear):
            state[f"model.language_model.{name}.weight"] = module.weight.float() * module.weight_scale
            converted += 1
    reference.load_state_dict(state)
    return reference, converted


def test_qwen_fp8_storage(qwen):
    root, model, tokenizer = qwen
    encoder = load_text_encoder_v5(root, dtype="fp32", storage="fp8")
    layer = encoder.model.layers[0]
    assert layer.self_attn.q_proj.weight.dtype == torch.float8_e4m3fn and layer.mlp.down_proj.weight.dtype == torch.float8_e4m3fn
    assert encoder.model.embed_tokens.weight.dtype == torch.float32 and layer.input_layernorm.weight.dtype == torch.float32
    reference, converted = _dequantized(model, encoder)
    assert converted == 7 * len(encoder.model.layers)  # q, k, v, o, gate, up, down of every built layer
    expected, _, _ = _qwen_reference(reference, tokenizer, PROMPTS)
    embeds, _ = encoder.encode_prompts(PROMPTS)
    assert rel_error(embeds, expected) < 1e-5  # fp8 weights upcast layer by layer, otherwise the same model
    plain, _ = load_text_encoder_v5(root, dtype="fp32").encode_prompts(PROMPTS)
    assert 0 < rel_error(embeds, plain) < 0.2
    assert encoder.activation_bytes(1) > load_text_encoder_v5(root, dtype="fp32").activation_bytes(1)


def test_qwen_fp8_files(tmp_path, qwen):
    """A folder whose weights are stored as float8 e4m3fn: upcast to the compute dtype, or kept with scale 1."""
    root, model, tokenizer = qwen
    fp8_root = tmp_path / "fp8"
    shutil.copytree(root / "tokenizer", fp8_root / "tokenizer")
    (fp8_root / "text_encoder").mkdir()
    shutil.copy(root / "text_encoder" / "config.json", fp8_root / "text_encoder" / "config.json")
    state = _release_keys(model.state_dict())
    _write_sharded(fp8_root / "text_encoder", state, dtype=torch.float8_e4m3fn)

    assert {p.dtype for p in load_text_encoder_v5(fp8_root, dtype="bf16").model.parameters()} == {torch.bfloat16}
    upcast = load_text_encoder_v5(fp8_root, dtype="fp32")
    reference = copy.deepcopy(model)
    reference.load_state_dict({k: v.to(torch.float8_e4m3fn).float() for k, v in model.state_dict().items()})
    expected, _, _ = _qwen_reference(reference, tokenizer, PROMPTS)
    assert rel_error(upcast.encode_prompts(PROMPTS)[0], expected) < 1e-5

    kept = load_text_encoder_v5(fp8_root, dtype="fp32", storage="fp8")
    q_proj = kept.model.layers[1].self_attn.q_proj
    assert torch.equal(q_proj.weight.view(torch.uint8),
                       state["model.layers.1.self_attn.q_proj.weight"].to(torch.float8_e4m3fn).view(torch.uint8))
    assert torch.equal(q_proj.weight_scale, torch.ones_like(q_proj.weight_scale))


def test_qwen_meta_build_reads_only_what_it_uses(qwen, monkeypatch):
    """Nothing is materialised before filling (no second copy), and the vision tower, the LM head, the
    last decoder layer and the final norm are never read."""
    root, _, _ = qwen
    materialised_at_fill = []
    read_keys = []
    assign = text_v5.assign_tensors
    iterate = text_v5.iter_safetensors

    def counting_assign(model, tensors, **kwargs):
        materialised_at_fill.append(sum(not p.is_meta for p in model.parameters()))
        return assign(model, tensors, **kwargs)

    def recording_iter(path, keys=None):
        read_keys.extend(keys or [])
        return iterate(path, keys=keys)

    monkeypatch.setattr(text_v5, "assign_tensors", counting_assign)
    monkeypatch.setattr(text_v5, "iter_safetensors", recording_iter)
    encoder = load_text_encoder_v5(root, dtype="fp32")
    assert materialised_at_fill == [0]
    assert not any(p.is_meta for p in encoder.model.parameters()) and not any(b.is_meta for b in encoder.model.buffers())
    assert read_keys and not [k for k in read_keys if k.startswith(("visual.", "lm_head.", "model.layers.2.", "model.norm."))]
    assert len(encoder.model.layers) == 2  # of 3: the last one is not built
    stored = sum(v.numel() for k, v in load_file_all(root / "text_encoder").items()
                 if k.startswith("model.") and not k.startswith(("model.layers.2.", "model.norm.")))
    assert sum(p.numel() for p in encoder.model.parameters()) == stored


def load_file_all(folder):
    out = {}
    for path in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(path)))
    return out


def test_qwen_other_layouts(tmp_path, qwen):
    """The `-diffusers` layout (tokenizer files inside text_encoder/) and files saved by newer transformers
    (`model.language_model.*`, `model.visual.*`) load to the same encoder."""
    root, model, tokenizer = qwen
    expected, _, _ = _qwen_reference(model, tokenizer, PROMPTS[:1])
    diffusers = _copy(root, tmp_path, "diffusers_layout")
    for path in (diffusers / "tokenizer").iterdir():
        shutil.move(str(path), diffusers / "text_encoder" / path.name)
    (diffusers / "tokenizer").rmdir()
    assert rel_error(load_text_encoder_v5(diffusers, dtype="fp32").encode_prompts(PROMPTS[0])[0], expected) < 1e-5
    newer = _copy(root, tmp_path, "newer_names")
    for path in (newer / "text_encoder").glob("model*"):
        path.unlink()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(newer / "text_encoder" / "model.safetensors"))
    assert rel_error(load_text_encoder_v5(newer, dtype="fp32").encode_prompts(PROMPTS[0])[0], expected) < 1e-5


def test_qwen_cache_release_and_placement(qwen):
    root, _, _ = qwen
    encoder = load_text_encoder_v5(root, dtype="fp32", cache_size=2)
    calls = []
    encoder.model.register_forward_pre_hook(lambda module, args, kwargs: calls.append(1), with_kwargs=True)
    batch, _ = encoder.encode_prompts(PROMPTS)  # three prompts, one forward each
    assert len(calls) == 3 and len(encoder._cache) == 2
    alone, _ = encoder.encode_prompts(PROMPTS[2])  # cached
    assert len(calls) == 3 and torch.equal(alone[0], batch[2])
    again, _ = encoder.encode_prompts(PROMPTS[0])  # evicted, encoded again alone: the same values
    assert len(calls) == 4 and torch.equal(again[0], batch[0])
    encoder.encode_prompts(PROMPTS[0], max_length=20)  # another length, another entry
    assert len(calls) == 5
    assert encoder.to("cpu") is encoder and encoder.device == torch.device("cpu")
    encoder.release()
    assert encoder.released and torch.equal(encoder.encode_prompts(PROMPTS[0], max_length=20)[0], encoder._cache.get(
        (PROMPTS[0], 20, encoder.identity))[0].unsqueeze(0))
    with pytest.raises(EasyAnimateError, match="released"):
        encoder.encode("a prompt never seen")


def test_qwen_activation_bytes(qwen):
    root, _, _ = qwen
    encoder = load_text_encoder_v5(root, dtype="bf16")
    one, four = encoder.activation_bytes(1), encoder.activation_bytes(4)
    assert four == 4 * one
    # At least one layer's MLP inner tensors and the attention scores of every head.
    assert one >= QWEN_MAX_LENGTH * (3 * 48 + 4 * QWEN_MAX_LENGTH) * 2
    assert load_text_encoder_v5(root, dtype="fp32").activation_bytes(1) == 2 * one
    assert encoder.activation_bytes(1, max_length=2 * QWEN_MAX_LENGTH) > 2 * one  # attention grows faster


# --------------------------------------------------------------------------------------------------
# V5: Bert + mT5
# --------------------------------------------------------------------------------------------------

V5_PROMPTS = ["A cat walks in the snow.", "一只猫在雪中行走", "", "zebra running"]


def test_v5_matches_transformers(v5):
    from transformers import BertTokenizer

    root, bert, t5 = v5
    encoder = load_text_encoder_v5(root, dtype="fp32")
    assert isinstance(encoder, BertMT5TextEncoder) and encoder.max_lengths == (77, 256)
    text = encoder.encode(V5_PROMPTS, "blurry, low quality")
    assert isinstance(text, V5TextEmbeddings)
    bert_inputs = _bert_reference_ids(root, V5_PROMPTS)
    # the reference's Python WordPiece and transformers' Rust BertTokenizer agree on these prompts
    fast = BertTokenizer.from_pretrained(str(root / "tokenizer"))(
        V5_PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    assert torch.equal(fast.input_ids, bert_inputs.input_ids)
    ids, mask, t5_ids, t5_mask = encoder.tokenize(V5_PROMPTS)
    assert torch.equal(ids, bert_inputs.input_ids) and torch.equal(mask, bert_inputs.attention_mask)
    assert ids[0, 0] == BERT_VOCAB.index("[CLS]") and ids[2, :3].tolist() == [2, 3, 0]  # "" -> [CLS] [SEP] [PAD]...
    assert (t5_ids[t5_mask.bool()].view(-1)[-1] == 1) and t5_mask[2].sum() == 1  # "</s>" only for ""
    with torch.no_grad():
        bert_expected = bert(input_ids=ids).last_hidden_state  # no attention mask, as the reference
        t5_expected = t5(input_ids=t5_ids).last_hidden_state
    assert text.bert.embeds.shape == (4, 77, 32) and text.t5.embeds.shape == (4, 256, 24)
    assert rel_error(text.bert.embeds, bert_expected) < 1e-5 and rel_error(text.t5.embeds, t5_expected) < 1e-5
    assert torch.equal(text.bert.mask, mask) and torch.equal(text.t5.mask, t5_mask)
    with torch.no_grad():
        masked = bert(input_ids=ids, attention_mask=mask).last_hidden_state
    assert rel_error(text.bert.embeds, masked) > 1e-3  # the mask is really not applied
    negative, negative_mask, negative_t5, _ = encoder.tokenize(["blurry, low quality"])
    with torch.no_grad():
        assert rel_error(text.bert.negative_embeds[1], bert(input_ids=negative).last_hidden_state[0]) < 1e-5
        assert rel_error(text.t5.negative_embeds[3], t5(input_ids=negative_t5).last_hidden_state[0]) < 1e-5
    assert text.bert.unknown_words == ("zebra", "running") and text.bert.negative_unknown_words == ()
    assert text.bert.negative_mask.shape == (4, 77)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_v5_half_precision(v5, dtype):
    root, bert, t5 = v5
    encoder = load_text_encoder_v5(root, dtype=dtype)
    # Every weight in the working dtype, T5's `wo` included (the reference casts the loaded encoder whole).
    assert {p.dtype for p in encoder.model.parameters()} == {dtype}
    ids, _, t5_ids, _ = encoder.tokenize(V5_PROMPTS)
    text = encoder.encode(V5_PROMPTS)
    with torch.no_grad():
        bert_expected = copy.deepcopy(bert).to(dtype)(input_ids=ids).last_hidden_state
        t5_expected = copy.deepcopy(t5).to(dtype)(input_ids=t5_ids).last_hidden_state
    assert text.bert.embeds.dtype == dtype and text.t5.embeds.dtype == dtype
    # equal here; one bf16 rounding step would be about 4e-3
    assert rel_error(text.bert.embeds, bert_expected) < 1e-3 and rel_error(text.t5.embeds, t5_expected) < 1e-3


def test_v5_fp8_storage(v5):
    from easyanimate.memory import Fp8Linear

    root, _, _ = v5
    encoder = load_text_encoder_v5(root, dtype="fp32", storage="fp8")
    fp8 = {name for name, module in encoder.model.named_modules() if isinstance(module, Fp8Linear)}
    assert "bert.encoder.layer.0.attention.self.query" in fp8 and "t5.encoder.block.0.layer.1.DenseReluDense.wi_0" in fp8
    assert not [n for n in fp8 if n.endswith(".wo")]  # T5 casts its feed-forward input to wo's dtype: kept
    plain = load_text_encoder_v5(root, dtype="fp32").encode(V5_PROMPTS)
    text = encoder.encode(V5_PROMPTS)
    assert 0 < rel_error(text.bert.embeds, plain.bert.embeds) < 0.2 and 0 < rel_error(text.t5.embeds, plain.t5.embeds) < 0.2


def test_v5_cache_and_activation_bytes(v5):
    root, _, _ = v5
    encoder = load_text_encoder_v5(root, dtype="fp32", cache_size=4)
    calls = []
    encoder.model["bert"].register_forward_pre_hook(lambda module, args, kwargs: calls.append(1), with_kwargs=True)
    first = encoder.encode(V5_PROMPTS[:2])
    again = encoder.encode(V5_PROMPTS[1])
    assert len(calls) == 2 and torch.equal(again.t5.embeds[0], first.t5.embeds[1])
    short = encoder.encode(V5_PROMPTS[1], max_lengths=(16, None))
    assert len(calls) == 3 and short.bert.embeds.shape[1] == 16 and short.t5.embeds.shape[1] == 256
    assert encoder.activation_bytes(2) > encoder.activation_bytes(1) > 256 * 2 * 48 * 4
    encoder.release()
    assert encoder.encode(V5_PROMPTS[1]).bert.embeds.shape == (1, 77, 32)
    with pytest.raises(EasyAnimateError, match="released"):
        encoder.encode("another")


# --------------------------------------------------------------------------------------------------
# Wrong and incomplete folders
# --------------------------------------------------------------------------------------------------


def _copy(root, tmp_path, name="copy"):
    target = tmp_path / name
    shutil.copytree(root, target)
    return target


def test_detection_names_what_it_found(tmp_path, qwen, v5):
    assert text_v5.detect_text_encoder_v5(qwen[0]) == "v5.1"
    assert text_v5.detect_text_encoder_v5(v5[0]) == "v5"
    with pytest.raises(LayoutError, match="does not exist"):
        load_text_encoder_v5(tmp_path / "nowhere")
    with pytest.raises(LayoutError, match="text_encoder/config.json"):
        load_text_encoder_v5(tmp_path)
    with pytest.raises(LayoutError, match="not a model folder"):
        load_text_encoder_v5(qwen[0] / "text_encoder")
    for model_type, message in (("t5", "V1–V3"), ("llama", "'llama'"), (None, "without model_type")):
        folder = tmp_path / f"release_{model_type}" / "text_encoder"
        folder.mkdir(parents=True)
        (folder / "config.json").write_text(json.dumps({"model_type": model_type} if model_type else {}))
        with pytest.raises(LayoutError, match=message):
            load_text_encoder_v5(folder.parent)
    no_t5 = _copy(v5[0], tmp_path, "no_t5")
    shutil.rmtree(no_t5 / "text_encoder_2")
    with pytest.raises(LayoutError, match="text_encoder_2"):
        load_text_encoder_v5(no_t5)
    qwen_second = _copy(v5[0], tmp_path, "qwen_second")
    (qwen_second / "text_encoder_2" / "config.json").write_text(json.dumps({"model_type": "qwen2_vl"}))
    with pytest.raises(LayoutError, match="'qwen2_vl'"):
        load_text_encoder_v5(qwen_second)


def test_incomplete_or_mismatched_qwen_folders(tmp_path, qwen):
    root = qwen[0]
    no_tokenizer = _copy(root, tmp_path, "no_tokenizer")
    shutil.rmtree(no_tokenizer / "tokenizer")
    with pytest.raises(LayoutError, match="tokenizer"):
        load_text_encoder_v5(no_tokenizer)
    no_template = _copy(root, tmp_path, "no_template")
    (no_template / "tokenizer" / "chat_template.json").unlink()
    with pytest.raises(LayoutError, match="chat template"):
        load_text_encoder_v5(no_template)
    missing_shard = _copy(root, tmp_path, "missing_shard")
    (missing_shard / "text_encoder" / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(LayoutError, match="model-00002-of-00002"):
        load_text_encoder_v5(missing_shard)
    wrong_config = _copy(root, tmp_path, "wrong_config")
    config = json.loads((wrong_config / "text_encoder" / "config.json").read_text())
    (wrong_config / "text_encoder" / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 28}))
    with pytest.raises(CheckpointMismatchError, match="num_hidden_layers = 28"):
        load_text_encoder_v5(wrong_config)
    incomplete = _copy(root, tmp_path, "incomplete")
    shard = incomplete / "text_encoder" / "model-00001-of-00002.safetensors"
    tensors = load_file(str(shard))
    dropped = next(k for k in tensors if k.startswith("model.layers.0."))
    save_file({k: v for k, v in tensors.items() if k != dropped}, str(shard))
    index = json.loads((incomplete / "text_encoder" / "model.safetensors.index.json").read_text())
    del index["weight_map"][dropped]
    (incomplete / "text_encoder" / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointMismatchError, match="missing"):
        load_text_encoder_v5(incomplete)


def test_incomplete_v5_folders(tmp_path, v5):
    root = v5[0]
    no_vocab = _copy(root, tmp_path, "no_vocab")
    (no_vocab / "tokenizer" / "vocab.txt").unlink()
    with pytest.raises(LayoutError, match="vocab.txt"):
        load_text_encoder_v5(no_vocab)
    no_spiece = _copy(root, tmp_path, "no_spiece")
    (no_spiece / "tokenizer_2" / "spiece.model").unlink()
    with pytest.raises(LayoutError, match="spiece.model"):
        load_text_encoder_v5(no_spiece)
    wrong_bert = _copy(root, tmp_path, "wrong_bert")
    config = json.loads((wrong_bert / "text_encoder" / "config.json").read_text())
    (wrong_bert / "text_encoder" / "config.json").write_text(json.dumps({**config, "hidden_size": 1024}))
    with pytest.raises(CheckpointMismatchError, match="hidden_size = 1024"):
        load_text_encoder_v5(wrong_bert)
    relu_t5 = _copy(root, tmp_path, "relu_t5")
    config = json.loads((relu_t5 / "text_encoder_2" / "config.json").read_text())
    config = {k: v for k, v in config.items() if k not in ("is_gated_act", "dense_act_fn")}
    (relu_t5 / "text_encoder_2" / "config.json").write_text(json.dumps({**config, "feed_forward_proj": "relu"}))
    with pytest.raises(CheckpointMismatchError, match="feed_forward_proj"):
        load_text_encoder_v5(relu_t5)
    small_vocab = _copy(root, tmp_path, "small_vocab")
    (small_vocab / "tokenizer" / "vocab.txt").write_text("\n".join(BERT_VOCAB + [f"w{i}" for i in range(10)]) + "\n")
    with pytest.raises(CheckpointMismatchError, match="do not belong together"):
        load_text_encoder_v5(small_vocab)


def test_bad_arguments(qwen):
    root = qwen[0]
    with pytest.raises(ValueError, match="storage"):
        load_text_encoder_v5(root, storage="int4")
    encoder = load_text_encoder_v5(root, dtype="fp32")
    with pytest.raises(EasyAnimateError, match="negative"):
        encoder.encode(["a", "b"], ["only one"])
    with pytest.raises(EasyAnimateError, match="string"):
        encoder.encode(["a", 3])
    with pytest.raises(EasyAnimateError, match="at least 1"):
        encoder.encode("a", max_length=0)


def test_import_is_cheap():
    code = "import sys, easyanimate.text_v5; print('transformers' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"
