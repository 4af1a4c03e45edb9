"""T5 text encoding: prompt cleaning, tokenizer, loading every supported layout, cache, bad inputs.

Every checkpoint is built here in tmp folders in the real layouts, with a tiny T5
(d_model 32, 4 heads, 2 layers, vocab 32128) and a tiny sentencepiece model trained at test time.
Our encodings are compared with transformers' own `T5EncoderModel` run directly on the same weights.
"""
from __future__ import annotations

import io
import json
import logging
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from easyanimate import cli
from easyanimate.errors import CheckpointMismatchError, CorruptCheckpointError, EasyAnimateError, LayoutError
from easyanimate.text import (
    T5PromptTokenizer,
    clean_caption_once,
    describe_unknown_words,
    load_text_encoder,
    preprocess_prompt,
)

TINY_T5 = dict(
    d_model=32, d_kv=8, num_heads=4, d_ff=64, num_layers=2, feed_forward_proj="gated-gelu",
    relative_attention_num_buckets=32, relative_attention_max_distance=128, layer_norm_epsilon=1e-6,
    vocab_size=32128, dropout_rate=0.0, tie_word_embeddings=False,
)

CORPUS = [
    "a cat walking in the snow, high quality, masterpiece",
    "the dog runs fast along the beach at sunset with waves",
    "a beautiful video of mountains and rivers under a blue sky",
    "close up of a red flower blooming in the garden, cinematic",
    "a young woman with blonde hair in a white dress in a forest",
    "the video is not of a high quality, it has a low resolution",
    "strange motion trajectory, blurry, ugly, distortion, deformed",
]

PROMPTS = [
    "A cat walking in the snow",
    "",
    "The dog runs fast along the beach at sunset, cinematic, masterpiece",
    "strange   spacing\tand\nnew lines",
]


# --------------------------------------------------------------------------------------------------
# Checkpoints in the real layouts
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    """A release-style tokenizer/ folder around a tiny, deterministically trained sentencepiece model."""
    import sentencepiece

    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS * 10), model_writer=model, vocab_size=120, model_type="unigram",
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, pad_piece="<pad>", eos_piece="</s>", unk_piece="<unk>",
        character_coverage=1.0, num_threads=1, hard_vocab_limit=False, minloglevel=2,
    )
    folder = tmp_path_factory.mktemp("tok") / "tokenizer"
    folder.mkdir()
    (folder / "spiece.model").write_bytes(model.getvalue())
    extra = [f"<extra_id_{i}>" for i in range(100)]
    (folder / "special_tokens_map.json").write_text(json.dumps(
        {"eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>", "additional_special_tokens": extra}))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "T5Tokenizer", "extra_ids": 100, "eos_token": "</s>", "pad_token": "<pad>",
         "unk_token": "<unk>", "additional_special_tokens": extra, "model_max_length": 512}))
    return folder


@pytest.fixture(scope="module")
def t5_weights():
    """(config dict, state dict) of a tiny T5 v1.1 encoder with every tensor random (norms included)."""
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(0)
    model = T5EncoderModel(T5Config(**TINY_T5))
    generator = torch.Generator().manual_seed(1)
    state = {}
    for name, tensor in model.state_dict().items():
        if name == "encoder.embed_tokens.weight":
            continue  # tied to shared.weight, not stored (as in the release files)
        scale = 0.5 if "layer_norm" in name else 1.0 if "shared" in name or "relative" in name else 0.3
        state[name] = torch.randn(tensor.shape, generator=generator) * scale + ("layer_norm" in name)
    return model.config.to_dict(), state


@pytest.fixture(scope="module")
def release_dir(tmp_path_factory, t5_weights, tokenizer_dir):
    """text_encoder/ as released: fp16 shards `model.fp16-0000N-of-00002` + `model.safetensors.index.json`."""
    config, state = t5_weights
    root = tmp_path_factory.mktemp("release")
    folder = root / "text_encoder"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({**config, "architectures": ["T5EncoderModel"]}))
    names = sorted(state)
    shards = {"model.fp16-00001-of-00002.safetensors": names[: len(names) // 2],
              "model.fp16-00002-of-00002.safetensors": names[len(names) // 2:]}
    weight_map = {}
    for shard, keys in shards.items():
        save_file({k: state[k].half().contiguous() for k in keys}, str(folder / shard), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(keys, shard))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (root / "tokenizer").symlink_to(tokenizer_dir, target_is_directory=True)
    return root


def _fp8_scaled(state):
    """ComfyUI's "scaled fp8" layout: fp8 weight = weight / scale, `.scale_weight` beside it, a marker."""
    out = {"scaled_fp8": torch.empty(0, dtype=torch.float8_e4m3fn)}
    for name, tensor in state.items():
        if name.endswith(".weight") and tensor.dim() == 2 and "shared" not in name and "relative" not in name:
            scale = tensor.abs().max() / 448.0
            out[name] = (tensor / scale).to(torch.float8_e4m3fn)
            out[name[: -len("weight")] + "scale_weight"] = scale.reshape(1).float()
        else:
            out[name] = tensor.half()
    return out


SINGLE_FILES = {
    # name: (how to write each tensor, key prefix)
    "t5xxl_fp16.safetensors": (lambda state: {k: v.half() for k, v in state.items()}, ""),
    "t5xxl_fp8_e4m3fn.safetensors": (
        lambda state: {k: v.to(torch.float8_e4m3fn) if v.dim() == 2 else v.half() for k, v in state.items()}, ""),
    "t5xxl_fp8_e4m3fn_scaled.safetensors": (_fp8_scaled, ""),
    "sd3_all_in_one.safetensors": (lambda state: {k: v.half() for k, v in state.items()}, "text_encoders.t5xxl.transformer."),
}


def _write_single_file(folder, name, state):
    convert, prefix = SINGLE_FILES[name]
    tensors = {prefix + k: v.contiguous() for k, v in convert(state).items()}
    if prefix:  # an all-in-one checkpoint also holds other models
        tensors["text_encoders.clip_l.transformer.text_model.encoder.layers.0.mlp.fc1.weight"] = torch.zeros(4, 2)
        tensors["model.diffusion_model.x_embedder.proj.weight"] = torch.zeros(2, 2)
    path = folder / name
    save_file(tensors, str(path))
    return path


def _upcast(name, state):
    """The weights a single file really holds, in float32 (what a correct loader must compute with)."""
    convert, _ = SINGLE_FILES[name]
    stored = convert(state)
    out = {}
    for key, value in stored.items():
        if key == "scaled_fp8" or key.endswith(".scale_weight"):
            continue
        scale_key = key[: -len("weight")] + "scale_weight"
        out[key] = value.float() * stored[scale_key].float() if scale_key in stored else value.float()
    return out


def _reference_model(config, state, dtype=torch.float32):
    """transformers' T5EncoderModel holding `state` (the reference we compare with)."""
    from transformers import T5Config, T5EncoderModel

    model = T5EncoderModel(T5Config(**config))
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"encoder.embed_tokens.weight"}
    model.set_input_embeddings(model.shared)
    return model.to(dtype).eval()


def _reference_encode(model, tokenizer, text, max_length=120):
    ids, mask = tokenizer([text], max_length)
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).last_hidden_state[0], mask[0]


# --------------------------------------------------------------------------------------------------
# Prompt cleaning
# --------------------------------------------------------------------------------------------------

# Expected values are what the reference cleaner (run twice, with beautifulsoup4 4.15 and ftfy 6.3)
# returned for these inputs.
CLEANING_CASES = [
    ("", ""),
    ("   ", ""),
    ("A Cat Walking In The Snow", "a cat walking in the snow"),
    ("Check https://example.com/page?id=3 and www.foo.org/bar now", "check ?id=3 and now"),
    ("<p>A <i>beautiful</i> sunset</p><script>alert(1)</script> over the sea", "a beautiful sunset over the sea"),
    ("Tom &amp; Jerry &lt;3 &nbsp;fun", "tom jerry <3 fun"),
    ("日本語のテキスト and 中文 mixed with 한국어", "のテキスト and mixed with 한국어"),
    ("a cat 🐱 and fire 🔥 at a party 🎉", "a cat 🐱 and fire 🔥 at a party 🎉"),
    ("ﬁne ligature ＦＵＬＬＷＩＤＴＨ\u3000text", "fine ligature fullwidth text"),
    ("“curly” ‘quotes’ «guillemets» — dashes – here", "\"curly\" 'quotes' \"guillemets\" - dashes - here"),
    ("ip 192.168.0.1 and file photo_001.png", "ip and file"),
    ("this-is-my-cute-cat_video", "this is my cute cat video"),
    ("sku jc6640 model 1920x1080 free shipping click for details page 3", "sku model"),
    ('"The whole prompt is quoted"', "the whole prompt is quoted"),
    ("wait... what", "wait what"),
    ("@someone says #123 hi 1234567", "says hi"),
    ("a%20b+c", "a b c"),
    ("<!-- hidden --> visible <![CDATA[cdata]]>", "visible cdata"),
    ("&#65;&#x42; caf&eacute;", "ab café"),
    ("line one\nline two\r\nline three\ttab", "line one line two line three tab"),
    ("x<y and a > b", "x b"),
    ("(parentheses) [brackets] {braces} | pipe \\ backslash / slash * star ~ tilde",
     "parentheses brackets braces pipe backslash slash star tilde"),
    ("A young woman with beautiful and clear eyes and blonde hair standing and white dress in a forest "
     "wearing a crown.", "a young woman with beautiful and clear eyes and blonde hair standing and white dress "
     "in a forest wearing a crown."),
    ("The video is not of a high quality, it has a low resolution. Deformation, low-resolution, blurry.",
     "the video is not of a high quality, it has a low resolution. deformation, low-resolution, blurry."),
    ("<person> walks, slowly:calmly", "person walks, slowly:calmly"),
    ("NUL\x00 and BOM\ufeff and zero-width\u200b", "nul and bom and zero-width\u200b"),
]


@pytest.mark.parametrize("text, expected", CLEANING_CASES, ids=range(len(CLEANING_CASES)))
def test_prompt_cleaning_matches_reference(text, expected):
    assert preprocess_prompt(text) == expected


# Worked out by hand from the reference's steps (two passes of: unquote_plus, strip + lower, URL
# regexes, BeautifulSoup(...).text, @nicknames, CJK, dashes, quotes, ..., stray punctuation, " . ",
# ftfy.fix_text, html.unescape twice, product codes, ..., "\s+" -> " ", strip). Each comment names
# the steps that change the text; a step not named leaves it alone.
LIBRARY_CASES = [
    # HTML. lower; BeautifulSoup drops the tags and the <style> contents and decodes "&amp;" ->
    # "a bold & italic cat"; "&" is stray punctuation -> " "; "\s+" -> " ".
    ('<p>A <b>Bold</b> &amp; <i>italic</i> cat</p><style>p {color: red}</style>', "a bold italic cat"),
    # HTML. A comment is not text, an attribute is not text, and <br/> adds no space:
    # "a " + "red" + " " + " circle" + "moving"; "\s+" -> " ".
    ('A <a href="x">Red</a> <!-- note --> Circle<br/>Moving', "a red circlemoving"),
    # URL. The first URL regex removes "http://" (scheme alternative), then "example.com/x" (host
    # alternative) -> "see  now"; "\s+" -> " ".
    ("see http://example.com/x now", "see now"),
    # URL. The host alternative stops at the first known top-level domain: "shop.example.co" goes,
    # ".uk" stays -> "visit .uk today"; the "(\D[,\./])\b" rule then adds a space after " ." ->
    # "visit . uk today". Second pass: " . " -> " ".
    ("visit shop.example.co.uk today", "visit uk today"),
    # Entities. lower; BeautifulSoup decodes "&amp;" and "&eacute;" -> "fish & chips in the été sun";
    # "&" -> " "; "\s+" -> " ".
    ("Fish &amp; Chips in the &eacute;t&eacute; sun", "fish chips in the été sun"),
    # A double-escaped entity. BeautifulSoup decodes one level: "i &lt;3 cats"; "&" is stray
    # punctuation -> "i  lt;3 cats" (no entity left for ftfy or html.unescape); "\s+" -> " ".
    ("I &amp;lt;3 cats", "i lt;3 cats"),
    # CJK. The CJK ranges (U+31C0..U+9FFF) remove 一只猫, 走路 and the enclosed ㈱; hiragana (ねこ) and
    # hangul (고양이) are outside them and stay; "\s+" -> " "; strip.
    ("一只猫 A Cat 走路 ねこ 고양이 ㈱", "a cat ねこ 고양이"),
    # Mojibake: “hello” written as UTF-8 and read as Windows-1252. Lower-casing leaves "â€œ" and
    # "â€\x9d" alone, no regex touches them; ftfy.fix_text repairs them to “ and ” and straightens both
    # to '"'.
    ("â€œhelloâ€\x9d world", '"hello" world'),
    # Mojibake of "…" (bytes E2 80 A6): ftfy repairs "â€¦" -> "…"; the ellipsis rule only knows "..".
    ("waitâ€¦ what", "wait… what"),
    # Mojibake of "café": lower turns its "Ã" into "ã" before ftfy runs, so ftfy no longer recognises
    # it; "©" is stray punctuation -> " "; "\s+" -> " ". The reference does not repair this one.
    ("CafÃ© au lait", "cafã au lait"),
    # Mojibake of "don’t" (E2 80 99 -> "â€™"): "™" is stray punctuation -> "donâ€ t stop"; ftfy then
    # reads "â€ " as the mojibake of "†" (E2 80 A0, with A0, a no-break space, typed as a space).
    ("donâ€™t stop", "don†t stop"),
]


@pytest.mark.parametrize("text, expected", LIBRARY_CASES, ids=range(len(LIBRARY_CASES)))
def test_prompt_cleaning_steps_worked_by_hand(text, expected):
    assert preprocess_prompt(text) == expected


def test_cleaning_imports_its_libraries_only_when_used():
    code = ("import sys, easyanimate.text as t; before = {'ftfy', 'bs4'} & set(sys.modules); "
            "t.preprocess_prompt('<b>x</b>'); print(sorted(before), sorted({'ftfy', 'bs4'} & set(sys.modules)))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[] ['bs4', 'ftfy']"


def test_path_like_prompt_gives_no_beautifulsoup_warning(recwarn):
    from bs4 import BeautifulSoup, MarkupResemblesLocatorWarning

    # bs4 warns that "a/b/c.txt" looks like a file name passed by mistake; a prompt is text.
    with pytest.warns(MarkupResemblesLocatorWarning):
        BeautifulSoup("a/b/c.txt", features="html.parser")
    recwarn.clear()
    # "/" is stray punctuation -> "a b c.txt"; "(\D[,\./])\b" adds a space after "c." -> "a b c. txt".
    assert preprocess_prompt("a/b/c.txt") == "a b c. txt"
    assert not [w for w in recwarn if issubclass(w.category, MarkupResemblesLocatorWarning)]


def test_cleaning_off_only_lowercases_and_strips():
    assert preprocess_prompt("  <b>Hello</b> WORLD https://x.com  ", clean=False) == "<b>hello</b> world https://x.com"


def test_cleaner_runs_twice():
    # The reference runs the cleaner twice; here one pass leaves work for the second one.
    assert clean_caption_once("a cat, -") == "a cat,"
    assert preprocess_prompt("a cat, -") == "a cat"
    assert preprocess_prompt("%2541") == "a"  # URL-decoded twice


def test_prompt_must_be_a_string():
    with pytest.raises(EasyAnimateError, match="string"):
        preprocess_prompt(None)


# --------------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------------


def test_tokenizer_matches_transformers(tokenizer_dir):
    from transformers import T5Tokenizer

    ours = T5PromptTokenizer.from_path(tokenizer_dir)
    theirs = T5Tokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
    texts = [preprocess_prompt(p) for p in PROMPTS] + CORPUS + ["unknown ÿ words 🐱"]
    ids, mask = ours(texts, 24)
    expected = theirs(texts, padding="max_length", max_length=24, truncation=True, return_tensors="pt")
    assert torch.equal(ids, expected.input_ids)
    assert torch.equal(mask, expected.attention_mask)


def test_tokenizer_layout(tokenizer_dir):
    tokenizer = T5PromptTokenizer.from_path(tokenizer_dir.parent)  # a folder holding tokenizer/
    ids, mask = tokenizer(["", "a cat " * 200], 120)
    assert ids.shape == mask.shape == (2, 120) and ids.dtype == mask.dtype == torch.long
    # Empty prompt: only </s>; the rest is <pad> with mask 0.
    assert ids[0, 0] == 1 and (ids[0, 1:] == 0).all() and mask[0].tolist() == [1] + [0] * 119
    # Long prompt: truncated to 119 pieces + </s>.
    assert ids[1, -1] == 1 and mask[1].all() and (ids[1, :-1] != 1).all()


def test_tokenizer_special_tokens(tokenizer_dir):
    tokenizer = T5PromptTokenizer.from_path(tokenizer_dir / "spiece.model")
    base = tokenizer.sp.get_piece_size()
    ids = tokenizer.token_ids("a <extra_id_0> cat</s>")
    # The sentinel is one id (the last one) and swallows the spaces around it; "</s>" is the eos id.
    assert ids == tokenizer.sp.encode("a") + [base + 99] + tokenizer.sp.encode("cat") + [1]
    full, mask = tokenizer(["a cat</s>"], 8)
    assert full[0].tolist().count(1) == 1  # no second </s> when the text already ends with one


# --------------------------------------------------------------------------------------------------
# Words the vocabulary lacks (the demo model's word-level vocabulary is small)
# --------------------------------------------------------------------------------------------------


def test_tokenizer_names_the_words_it_cannot_spell():
    tokenizer = T5PromptTokenizer.from_path(cli.demo_model_path())
    # The demo knows "a", "red", "circle", "moving", "left", ... as whole words. "banana" and the made-up
    # "zorblax" are not among them, nor is "left," (punctuation glued to a word makes another word).
    assert tokenizer.unknown_words("a red banana moving left, zorblax banana") == ["banana", "left,", "zorblax"]
    assert tokenizer.unknown_words("a red circle moving left on a black background") == []
    assert tokenizer.unknown_words("a <unk> circle") == []  # a special token typed in is not a word


def test_encoder_reports_unknown_words(caplog):
    encoder = load_text_encoder(cli.demo_model_path(), dtype="fp32")
    with caplog.at_level(logging.WARNING, logger="easyanimate.text"):
        text = encoder.encode("A Red ZORBLAX moving left", negative_prompts="blurry, ugly")
    # Words are reported as the tokenizer sees them: cleaned, so lower-cased.
    assert text.unknown_words == ("zorblax",)
    assert text.negative_unknown_words == ("blurry,", "ugly")
    assert 'In the prompt, the model\'s vocabulary has no "zorblax"; that word is ignored.' in caplog.text
    assert 'In the negative prompt, the model\'s vocabulary has no "blurry,", "ugly"' in caplog.text
    assert encoder.unknown_words(["a red circle", "a zorblax"]) == ("zorblax",)  # the tokenizer alone
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="easyanimate.text"):
        known = encoder.encode("a red circle moving left")
    assert known.unknown_words == () and known.negative_unknown_words == () and not caplog.records
    assert describe_unknown_words(("banana", "xyz")) == (
        'the model\'s vocabulary has no "banana", "xyz"; those words are ignored')


# --------------------------------------------------------------------------------------------------
# Loading and encoding, compared with transformers' T5EncoderModel
# --------------------------------------------------------------------------------------------------


def test_release_folder_matches_transformers(release_dir):
    from transformers import T5EncoderModel

    encoder = load_text_encoder(release_dir, dtype="fp32")
    reference = T5EncoderModel.from_pretrained(
        str(release_dir / "text_encoder"), dtype=torch.float32, local_files_only=True).eval()
    result = encoder.encode(PROMPTS, negative_prompts="blurry, Low Quality")
    assert result.embeds.shape == (len(PROMPTS), 120, 32) and result.embeds.dtype == torch.float32
    assert result.negative_embeds.shape == result.embeds.shape
    for row, prompt in enumerate(PROMPTS):
        embeds, mask = _reference_encode(reference, encoder.tokenizer, preprocess_prompt(prompt))
        assert torch.equal(result.embeds[row], embeds) and torch.equal(result.mask[row], mask)
    negative, negative_mask = _reference_encode(reference, encoder.tokenizer, "blurry, low quality")
    assert torch.equal(result.negative_embeds[1], negative) and torch.equal(result.negative_mask[3], negative_mask)


def test_fp16_keeps_wo_in_fp32_like_transformers(release_dir):
    from transformers import T5EncoderModel

    encoder = load_text_encoder(release_dir / "text_encoder", dtype=torch.float16)  # tokenizer from the sibling
    reference = T5EncoderModel.from_pretrained(
        str(release_dir / "text_encoder"), dtype=torch.float16, local_files_only=True).eval()
    assert encoder.model.encoder.block[0].layer[1].DenseReluDense.wo.weight.dtype == torch.float32
    assert encoder.dtype == torch.float16
    embeds, mask = encoder.encode_prompts(PROMPTS[0])
    expected, expected_mask = _reference_encode(reference, encoder.tokenizer, preprocess_prompt(PROMPTS[0]))
    assert embeds.dtype == torch.float16
    assert torch.equal(embeds[0], expected) and torch.equal(mask[0], expected_mask)


@pytest.mark.parametrize("name", sorted(SINGLE_FILES))
def test_single_file_matches_transformers(name, tmp_path, t5_weights, release_dir):
    config, state = t5_weights
    path = _write_single_file(tmp_path, name, state)
    encoder = load_text_encoder(path, tokenizer=release_dir, dtype="fp32")  # tokenizer from a release folder
    reference = _reference_model(config, _upcast(name, state))
    embeds, mask = encoder.encode_prompts(PROMPTS)
    for row, prompt in enumerate(PROMPTS):
        expected, expected_mask = _reference_encode(reference, encoder.tokenizer, preprocess_prompt(prompt))
        assert torch.equal(embeds[row], expected) and torch.equal(mask[row], expected_mask)


def test_single_file_in_bf16(tmp_path, t5_weights, tokenizer_dir):
    config, state = t5_weights
    path = _write_single_file(tmp_path, "t5xxl_fp8_e4m3fn.safetensors", state)
    encoder = load_text_encoder(path, tokenizer=tokenizer_dir / "spiece.model", dtype="bf16")
    assert {p.dtype for p in encoder.model.parameters()} == {torch.bfloat16}  # fp8 upcast for compute
    reference = _reference_model(config, _upcast("t5xxl_fp8_e4m3fn.safetensors", state), torch.bfloat16)
    embeds, _ = encoder.encode_prompts(PROMPTS[0])
    expected, _ = _reference_encode(reference, encoder.tokenizer, preprocess_prompt(PROMPTS[0]))
    assert embeds.dtype == torch.bfloat16 and torch.equal(embeds[0], expected)


# --------------------------------------------------------------------------------------------------
# Cache
# --------------------------------------------------------------------------------------------------


def _count_forwards(encoder):
    calls = []
    encoder.model.register_forward_pre_hook(lambda module, args, kwargs: calls.append(1), with_kwargs=True)
    return calls


def test_cache_skips_the_model_on_repeat(release_dir):
    encoder = load_text_encoder(release_dir, dtype="fp32", cache_size=4)
    calls = _count_forwards(encoder)
    first = encoder.encode("A cat in the snow -", "blurry")
    assert len(calls) == 2
    again = encoder.encode("A cat in the snow -", "blurry")
    assert len(calls) == 2  # nothing re-encoded
    assert all(torch.equal(a, b) for a, b in zip(first[:4], again[:4]))  # embeds and masks
    encoder.encode("  a cat in the snow")  # cleans to the same text: same tokens, same cache entry
    assert len(calls) == 2
    encoder.encode("A cat in the snow -", clean_caption=False)  # "a cat in the snow -" reaches the tokenizer
    assert len(calls) == 3
    encoder.encode("A cat in the snow -", max_length=60)  # different settings
    assert len(calls) == 4
    encoder.clear_cache()
    encoder.encode("A cat in the snow -")
    assert len(calls) == 5


def test_cache_is_bounded_and_batch_independent(release_dir):
    encoder = load_text_encoder(release_dir, dtype="fp32", cache_size=2)
    calls = _count_forwards(encoder)
    batch, _ = encoder.encode_prompts(["one", "two", "three"])
    assert len(calls) == 3 and len(encoder._cache) == 2
    alone, _ = encoder.encode_prompts("three")  # still cached
    assert len(calls) == 3 and torch.equal(alone[0], batch[2])
    again, _ = encoder.encode_prompts("one")  # evicted, encoded again to the same values
    assert len(calls) == 4 and torch.equal(again[0], batch[0])


def test_cache_can_be_disabled(release_dir):
    encoder = load_text_encoder(release_dir, dtype="fp32", cache_size=0)
    calls = _count_forwards(encoder)
    encoder.encode("x")
    encoder.encode("x")
    assert len(calls) == 2


# --------------------------------------------------------------------------------------------------
# Bad inputs
# --------------------------------------------------------------------------------------------------


def test_negative_prompts_must_match_the_batch(release_dir):
    encoder = load_text_encoder(release_dir, dtype="fp32")
    with pytest.raises(EasyAnimateError, match="negative"):
        encoder.encode(["a", "b"], ["only one"])
    with pytest.raises(EasyAnimateError, match="string"):
        encoder.encode(["a", 3])


def test_corrupt_file(tmp_path, t5_weights, tokenizer_dir):
    path = _write_single_file(tmp_path, "t5xxl_fp16.safetensors", t5_weights[1])
    data = path.read_bytes()
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptCheckpointError, match="truncated"):
        load_text_encoder(truncated, tokenizer=tokenizer_dir)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\xff" * 64)
    with pytest.raises(CorruptCheckpointError):
        load_text_encoder(garbage, tokenizer=tokenizer_dir)


def test_release_without_tokenizer(tmp_path, release_dir):
    (tmp_path / "text_encoder").symlink_to(release_dir / "text_encoder", target_is_directory=True)
    with pytest.raises(LayoutError, match="tokenizer"):
        load_text_encoder(tmp_path)
    with pytest.raises(LayoutError, match="spiece.model"):
        load_text_encoder(tmp_path, tokenizer=tmp_path)


def test_single_file_needs_a_tokenizer(tmp_path, t5_weights):
    path = _write_single_file(tmp_path, "t5xxl_fp16.safetensors", t5_weights[1])
    with pytest.raises(LayoutError, match="tokenizer"):
        load_text_encoder(path)


def test_clip_text_encoder_instead_of_t5(tmp_path, tokenizer_dir):
    clip_l = {f"text_model.encoder.layers.{i}.mlp.fc1.weight": torch.zeros(8, 4) for i in range(12)}
    clip_l["text_model.embeddings.token_embedding.weight"] = torch.zeros(10, 4)
    path = tmp_path / "clip_l.safetensors"
    save_file(clip_l, str(path))
    with pytest.raises(LayoutError, match="CLIP-L text encoder, not T5"):
        load_text_encoder(path, tokenizer=tokenizer_dir)


def test_umt5_is_rejected(tmp_path, t5_weights, tokenizer_dir):
    state = dict(t5_weights[1])
    state["encoder.block.1.layer.0.SelfAttention.relative_attention_bias.weight"] = torch.zeros(32, 4)
    path = _write_single_file(tmp_path, "t5xxl_fp16.safetensors", state)
    with pytest.raises(LayoutError, match="UMT5"):
        load_text_encoder(path, tokenizer=tokenizer_dir)


def test_incomplete_file(tmp_path, t5_weights, tokenizer_dir):
    state = {k: v for k, v in t5_weights[1].items() if "block.1.layer.1" not in k}
    path = _write_single_file(tmp_path, "t5xxl_fp16.safetensors", state)
    with pytest.raises(CheckpointMismatchError, match="missing"):
        load_text_encoder(path, tokenizer=tokenizer_dir)


def test_tokenizer_larger_than_embedding(tmp_path, t5_weights, tokenizer_dir):
    state = dict(t5_weights[1])
    state["shared.weight"] = state["shared.weight"][:50]
    path = _write_single_file(tmp_path, "t5xxl_fp16.safetensors", state)
    with pytest.raises(CheckpointMismatchError, match="do not belong together"):
        load_text_encoder(path, tokenizer=tokenizer_dir)


def test_wrong_model_type_in_folder(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "clip_text_model"}))
    with pytest.raises(LayoutError, match="T5"):
        load_text_encoder(tmp_path)


def test_import_is_cheap():
    code = "import sys, easyanimate.text, easyanimate.image_encoder; print('transformers' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"
