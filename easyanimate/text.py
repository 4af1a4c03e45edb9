"""T5 text encoding for EasyAnimate: prompt cleaning, tokenizing, the encoder, a cache.

Every EasyAnimate release (V1–V3) conditions its transformer on the last hidden state of the T5 v1.1
XXL encoder: 120 tokens, padded to full length, with an attention mask. This module turns prompts into
those embeddings:

1. **Prompt cleaning** (`preprocess_prompt`): the reference runs the DeepFloyd-IF caption cleaner twice
   over every prompt, positive and negative (`clean_caption=True` by default): URL decoding, regular
   expressions, `beautifulsoup4` to drop HTML and `ftfy` to repair broken text (mojibake such as
   "â€œ" -> '"', entities, ligatures, fullwidth letters). We run the same steps with the same two
   libraries, so a prompt is cleaned exactly as the reference cleans it, quirks included: the prompt
   is lower-cased before ftfy sees it, so mojibake with capitals ("cafÃ©") is no longer recognised.
2. **Tokenizing** (`T5PromptTokenizer`): the release's sentencepiece `spiece.model`, used the way the
   reference's slow `T5Tokenizer` (legacy mode) uses it: special tokens split out, `</s>` appended,
   truncated to 120, padded with `<pad>` to 120. We call sentencepiece directly because transformers 5
   only offers a converted fast tokenizer, whose results differ from the slow one: it appends a second
   `</s>` to a text that ends with one, and it splits words differently for word-level models (the
   demo's), e.g. "a. b, c!".
3. **The encoder** (`load_text_encoder`): transformers' own `T5EncoderModel`, built on the `meta`
   device and filled tensor by tensor in the requested dtype, from a release's `text_encoder/` folder
   (sharded fp16 safetensors with an index) or from the single-file T5-XXL encoders ComfyUI users
   have for Flux/SD3 (`t5xxl_fp16.safetensors`, `t5xxl_fp8_e4m3fn.safetensors`, also the
   `..._scaled` fp8 variant). fp8 weights are upcast to the compute dtype while loading.
4. **The cache** (`T5TextEncoder`): embeddings per (cleaned prompt, settings, encoder identity), kept
   by the encoder object in a small LRU, so re-running a graph with the same prompt does not run T5.

Typical use::

    encoder = load_text_encoder("models/EasyAnimateV3-XL-2-InP-512x512", dtype="bf16", device="cuda")
    text = encoder.encode("a cat walking in the snow", negative_prompts="blurry, low quality")
    text.embeds, text.mask, text.negative_embeds, text.negative_mask   # (1, 120, 4096), (1, 120), ...

transformers, ftfy and Beautiful Soup are imported inside the functions that need them, so importing
this module is cheap.
"""
from __future__ import annotations

import html
import logging
import os
import re
import urllib.parse
from collections import OrderedDict
from pathlib import Path
from typing import NamedTuple, Sequence

import torch

from .checkpoint import (
    SAFETENSORS_SUFFIXES,
    assign_tensors,
    check_config_against_weights,
    count_indexed,
    describe_keys,
    file_key_shapes,
    iter_file,
    iter_safetensors,
    meta_tensors,
    parse_dtype,
    read_json_config,
    weight_files,
)
from .errors import CheckpointMismatchError, EasyAnimateError, LayoutError

logger = logging.getLogger(__name__)

# The reference pipelines' `max_sequence_length`: every prompt becomes exactly this many tokens.
DEFAULT_MAX_LENGTH = 120


# ==================================================================================================
# 1. Prompt cleaning
# ==================================================================================================


def preprocess_prompt(text: str, clean: bool = True) -> str:
    """The text the reference feeds to the tokenizer for one prompt.

    With `clean` (the reference default) the caption cleaner runs twice, as the reference does;
    without it the reference only lower-cases and strips.
    """
    if not isinstance(text, str):
        raise EasyAnimateError(f"A prompt must be a string, got {type(text).__name__}. Use \"\" for an empty prompt.")
    if not clean:
        return text.lower().strip()
    return clean_caption_once(clean_caption_once(text))


# Characters the reference replaces by a space wherever they occur (runs of them become one space).
_STRAY_PUNCTUATION = re.compile(r"[#®•©™&@·º½¾¿¡§~)(\]\[}{|\\/*]+")

# All kinds of dashes and hyphens -> "-".
_DASHES = re.compile(
    r"[\u002D\u058A\u05BE\u1400\u1806\u2010-\u2015\u2E17\u2E1A\u2E3A\u2E3B\u2E40\u301C\u3030\u30A0"
    r"\uFE31\uFE32\uFE58\uFE63\uFF0D]+"
)

# The reference removes seven CJK blocks one after another (strokes, katakana extensions, enclosed
# letters, compatibility, ideographs extension A, Yijing hexagrams, unified ideographs). They are
# adjacent, so together they are the single range U+31C0..U+9FFF. Hiragana, katakana and hangul stay.
_CJK = re.compile(r"[\u31c0-\u9fff]+")

# URLs: a scheme prefix ("https://", "www:") or a host name ending in one of a few top-level domains,
# with its path. These two patterns are the reference's, unchanged, since they define what is removed.
_URL_PATTERNS = (
    re.compile(r"\b((?:https?:(?:\/{1,3}|[a-zA-Z0-9%])|[a-zA-Z0-9.\-]+[.](?:com|co|ru|net|org|edu|gov|it)[\w/-]*\b\/?(?!@)))"),
    re.compile(r"\b((?:www:(?:\/{1,3}|[a-zA-Z0-9%])|[a-zA-Z0-9.\-]+[.](?:com|co|ru|net|org|edu|gov|it)[\w/-]*\b\/?(?!@)))"),
)

_FILE_EXTENSIONS = r"(?:png|jpg|jpeg|bmp|webp|eps|pdf|apk|mp4)"

# (pattern, replacement) pairs applied in order after HTML removal and before the text fixes.
_BEFORE_TEXT_FIXES = [
    (re.compile(r"@[\w\d]+\b"), ""),                            # @nicknames
    (_CJK, ""),
    (_DASHES, "-"),
    (re.compile(r"[`´«»“”¨]"), '"'),                            # one kind of double quote
    (re.compile(r"[‘’]"), "'"),                                 # one kind of single quote
    (re.compile(r"&quot;?"), ""),
    (re.compile(r"&amp"), ""),
    (re.compile(r"\d{1,3}\.\d{1,3}\.\d{1,3}\.\d{1,3}"), " "),   # IP addresses
    (re.compile(r"\d:\d\d\s+$"), ""),                           # trailing article ids / times
    (re.compile(r"\\n"), " "),                                  # a literal backslash-n
    (re.compile(r"#\d{1,3}\b"), ""),                            # "#123"
    (re.compile(r"#\d{5,}\b"), ""),                             # "#12345..."
    (re.compile(r"\b\d{6,}\b"), ""),                            # long numbers
    (re.compile(r"[\S]+\." + _FILE_EXTENSIONS), ""),            # file names
    (re.compile(r"[\"\']{2,}"), '"'),                           # """quoted"""
    (re.compile(r"[\.]{2,}"), " "),                             # ellipses
    (_STRAY_PUNCTUATION, " "),
    (re.compile(r"\s+\.\s+"), " "),                             # " . "
]

# Words glued with "-" or "_" (this-is-my-cute-cat) are split when there are more than three joints.
_JOINTS = re.compile(r"(?:\-|\_)")

_AFTER_TEXT_FIXES = [
    (re.compile(r"\b[a-zA-Z]{1,3}\d{3,15}\b"), ""),             # product codes: jc6640
    (re.compile(r"\b[a-zA-Z]+\d+[a-zA-Z]+\b"), ""),             # jc6640vc
    (re.compile(r"\b\d+[a-zA-Z]+\d+\b"), ""),                   # 6640vc231
    (re.compile(r"(worldwide\s+)?(free\s+)?shipping"), ""),
    (re.compile(r"(free\s)?download(\sfree)?"), ""),
    (re.compile(r"\bclick\b\s(?:for|on)\s\w+"), ""),
    (re.compile(r"\b" + _FILE_EXTENSIONS + r"(\simage[s]?)?"), ""),
    (re.compile(r"\bpage\s+\d+\b"), ""),
    (re.compile(r"\b\d*[a-zA-Z]+\d+[a-zA-Z]+\d+[a-zA-Z\d]*\b"), " "),  # j2d1a2a...
    (re.compile(r"\b\d+\.?\d*[xх×]\d+\.?\d*\b"), ""),          # sizes: 1920x1080 (latin x, cyrillic х, ×)
    (re.compile(r"\b\s+\:\s+"), ": "),
    (re.compile(r"(\D[,\./])\b"), r"\1 "),                      # a space after punctuation glued to a word
    (re.compile(r"\s+"), " "),
    (re.compile(r"^[\"\']([\w\W]+)[\"\']$"), r"\1"),            # quotes around the whole prompt
    (re.compile(r"^[\'\_,\-\:;]"), ""),                         # leading punctuation
    (re.compile(r"[\'\_,\-\:\-\+]$"), ""),                      # trailing punctuation
    (re.compile(r"^\.\S+$"), ""),                               # a lone ".word"
]


def clean_caption_once(caption: str) -> str:
    """One pass of the reference caption cleaner (DeepFloyd IF's `_clean_caption`, which PixArt and
    EasyAnimate copied), step by step in the reference's order."""
    import ftfy  # imported here, like bs4 below: most users of this module never clean a prompt

    caption = urllib.parse.unquote_plus(str(caption))
    caption = caption.strip().lower()
    caption = caption.replace("<person>", "person")
    for pattern in _URL_PATTERNS:
        caption = pattern.sub("", caption)
    caption = _html_text(caption)
    for pattern, replacement in _BEFORE_TEXT_FIXES:
        caption = pattern.sub(replacement, caption)
    if len(_JOINTS.findall(caption)) > 3:
        caption = _JOINTS.sub(" ", caption)
    # Repairs mojibake ("cafÃ©" -> "café"), decodes entities, splits ligatures, narrows fullwidth
    # letters, straightens quotes, drops control characters and normalises to NFC.
    caption = ftfy.fix_text(caption)
    caption = html.unescape(html.unescape(caption))
    for pattern, replacement in _AFTER_TEXT_FIXES:
        caption = pattern.sub(replacement, caption)
    return caption.strip()


def _html_text(caption: str) -> str:
    """The text of `caption` read as HTML, as the reference gets it: `BeautifulSoup(caption,
    features="html.parser").text` (tags, comments and script/style contents dropped, entities decoded)."""
    import warnings

    from bs4 import BeautifulSoup, MarkupResemblesLocatorWarning

    with warnings.catch_warnings():
        # bs4 warns when the markup looks like a file name or URL ("a cat.png") passed by mistake;
        # a prompt is always meant as text.
        warnings.simplefilter("ignore", MarkupResemblesLocatorWarning)
        return BeautifulSoup(caption, features="html.parser").text


# ==================================================================================================
# 2. Tokenizer
# ==================================================================================================


class T5PromptTokenizer:
    """The T5 sentencepiece tokenizer with the reference's call: pad to `max_length`, truncate, `</s>`.

    Reproduces transformers' slow `T5Tokenizer` in legacy mode (what the PixArt/EasyAnimate tokenizer
    folders load as): the special tokens `<pad>`, `</s>`, `<unk>` and `<extra_id_N>` are cut out of the
    text first (sentinels also swallow the spaces around them), every other piece of text goes through
    sentencepiece as is, `</s>` is appended unless the text already ends with it.
    """

    def __init__(self, model_proto: bytes, *, source: str = "spiece.model", extra_ids: int = 100,
                 strip_around: dict[str, tuple[bool, bool]] | None = None):
        import sentencepiece

        self.source = source
        self.sp = sentencepiece.SentencePieceProcessor(model_proto=model_proto)
        base = self.sp.get_piece_size()
        self.special_ids = {piece: self.sp.piece_to_id(piece) for piece in ("<pad>", "</s>", "<unk>")}
        for piece, token_id in self.special_ids.items():
            if self.sp.id_to_piece(token_id) != piece:
                raise LayoutError(
                    f"Tokenizer '{source}' has no '{piece}' piece, so it is not a T5 sentencepiece model. "
                    "Use the tokenizer/ folder of an EasyAnimate (or PixArt-α) release."
                )
        # Sentinels come after the sentencepiece vocabulary, in reverse: <extra_id_0> is the last id.
        for i in range(extra_ids):
            self.special_ids[f"<extra_id_{i}>"] = base + extra_ids - 1 - i
        self.pad_id = self.special_ids["<pad>"]
        self.eos_id = self.special_ids["</s>"]
        self.vocab_size = base + extra_ids
        # (strip spaces on the left, on the right) per special token; sentinels strip both by default.
        self.strip_around = {tok: (tok.startswith("<extra_id_"),) * 2 for tok in self.special_ids}
        self.strip_around.update(strip_around or {})
        longest_first = sorted(self.special_ids, key=len, reverse=True)
        self._special_split = re.compile("(" + "|".join(re.escape(t) for t in longest_first) + ")")

    @classmethod
    def from_path(cls, path: str | os.PathLike) -> "T5PromptTokenizer":
        """A tokenizer from a `spiece.model` file, a tokenizer folder, or a release folder with `tokenizer/`."""
        path = Path(path)
        folder = path.parent if path.is_file() else path
        if path.is_dir():
            if not (path / "spiece.model").is_file() and (path / "tokenizer" / "spiece.model").is_file():
                folder = path / "tokenizer"
            path = folder / "spiece.model"
        if not path.is_file():
            raise LayoutError(
                f"No T5 tokenizer at '{path}': expected a sentencepiece 'spiece.model'. Pass the tokenizer/ "
                "folder of an EasyAnimate release (or the release folder itself)."
            )
        extra_ids, strip_around = 100, {}
        config_file = folder / "tokenizer_config.json"
        if path.name == "spiece.model" and config_file.is_file():
            config = read_json_config(config_file, what="tokenizer config")
            extra_ids = int(config.get("extra_ids", 100))
            for token in (config.get("added_tokens_decoder") or {}).values():
                if isinstance(token, dict) and "content" in token:
                    strip_around[token["content"]] = (bool(token.get("lstrip")), bool(token.get("rstrip")))
        try:
            tokenizer = cls(path.read_bytes(), source=str(path), extra_ids=extra_ids, strip_around=strip_around)
        except LayoutError:
            raise
        except Exception as err:  # sentencepiece reports a bad file as a RuntimeError
            raise LayoutError(f"'{path}' is not a readable sentencepiece model ({err}).") from None
        return tokenizer

    def token_ids(self, text: str) -> list[int]:
        """The ids of `text`, without `</s>`, padding or truncation."""
        chunks = self._special_split.split(text)
        # chunks alternate: text, special, text, special, ..., text
        for i in range(1, len(chunks), 2):
            strip_left, strip_right = self.strip_around.get(chunks[i], (False, False))
            if strip_left:
                chunks[i - 1] = chunks[i - 1].rstrip()
            if strip_right:
                chunks[i + 1] = chunks[i + 1].lstrip()
        ids: list[int] = []
        for i, chunk in enumerate(chunks):
            if i % 2:
                ids.append(self.special_ids[chunk])
            elif chunk:
                ids.extend(self.sp.encode(chunk))
        return ids

    def unknown_words(self, text: str) -> list[str]:
        """The words of `text` (split at white space) that the vocabulary cannot spell, each once.

        sentencepiece turns such a word, or the characters of it that no piece covers, into `<unk>`:
        one embedding shared by everything unknown, so the model learns nothing about the word. A
        literal special token such as `<unk>` typed into the prompt is not a word and is not listed.
        """
        unknown_id = self.special_ids["<unk>"]
        if unknown_id not in self.token_ids(text):
            return []
        words: list[str] = []
        chunks = self._special_split.split(text)
        for text_chunk in chunks[::2]:  # chunks alternate: text, special, text, ...
            # sentencepiece splits at white space before choosing pieces, so a word alone gets the
            # pieces it gets inside the prompt.
            for word in text_chunk.split():
                if word not in words and unknown_id in self.sp.encode(word):
                    words.append(word)
        return words

    def __call__(self, texts: Sequence[str], max_length: int = DEFAULT_MAX_LENGTH) -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids, attention_mask), both int64 of shape (len(texts), max_length)."""
        input_ids = torch.full((len(texts), max_length), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(texts), max_length), dtype=torch.long)
        for row, text in enumerate(texts):
            ids = self.token_ids(text)
            if len(ids) + 1 > max_length:
                logger.warning(
                    "Prompt is longer than %d tokens; this part is cut off: %r",
                    max_length, self.sp.decode([i for i in ids[max_length - 1:] if i < self.sp.get_piece_size()]),
                )
                ids = ids[: max_length - 1]
            if not ids or ids[-1] != self.eos_id:
                ids = ids + [self.eos_id]
            input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            mask[row, : len(ids)] = 1
        return input_ids, mask


# ==================================================================================================
# 3. Loading the T5 encoder
# ==================================================================================================

# Prefixes under which single-file checkpoints store the T5 encoder (ComfyUI's own files have none;
# SD3 all-in-one checkpoints use `text_encoders.t5xxl.transformer.`). Found from the final norm's key.
_T5_MARKER = "encoder.final_layer_norm.weight"


def load_text_encoder(
    source: str | os.PathLike,
    tokenizer: str | os.PathLike | T5PromptTokenizer | None = None,
    *,
    dtype: torch.dtype | str = torch.bfloat16,
    device: torch.device | str = "cpu",
    max_length: int = DEFAULT_MAX_LENGTH,
    cache_size: int = 16,
) -> "T5TextEncoder":
    """Load the T5 encoder and its tokenizer.

    `source` is one of:
      * an EasyAnimate/PixArt release folder (uses its `text_encoder/` and `tokenizer/`),
      * a `text_encoder/` folder (the tokenizer defaults to the sibling `tokenizer/`),
      * a single-file T5-XXL encoder (`.safetensors`, or a legacy `.bin`/`.pt`), e.g. ComfyUI's
        `t5xxl_fp16.safetensors` / `t5xxl_fp8_e4m3fn.safetensors`; it has no tokenizer, so pass one.
    `tokenizer` is a release folder, a `tokenizer/` folder, a `spiece.model` file, or a
    `T5PromptTokenizer`. `dtype` is the compute dtype (fp8 files are upcast to it). Nothing is ever
    downloaded: only local files are read.
    """
    dtype = parse_dtype(dtype)
    if max_length < 1:
        raise EasyAnimateError(f"max_length must be at least 1 token, got {max_length}.")
    source = Path(source)
    if source.is_file():
        build = _single_file_t5(source)
        default_tokenizer = None
    elif source.is_dir():
        text_encoder_dir = source / "text_encoder" if (source / "text_encoder").is_dir() else source
        build = _folder_t5(text_encoder_dir)
        default_tokenizer = text_encoder_dir.parent / "tokenizer"
    else:
        raise LayoutError(f"Text encoder path '{source}' does not exist.")

    if tokenizer is None:
        if default_tokenizer is None:
            raise LayoutError(
                f"'{source.name}' is a single-file T5 encoder and carries no tokenizer. Pass tokenizer= the "
                "folder of an EasyAnimate release (its tokenizer/ is used) or a folder with spiece.model."
            )
        if not default_tokenizer.is_dir():
            raise LayoutError(
                f"'{source}' has a text encoder but no tokenizer/ folder next to it ({default_tokenizer}). "
                "The download is incomplete: fetch the release's tokenizer/ folder, or pass tokenizer=."
            )
        tokenizer = default_tokenizer
    if not isinstance(tokenizer, T5PromptTokenizer):
        tokenizer = T5PromptTokenizer.from_path(tokenizer)

    model = _build_t5(build, dtype=dtype, device=device)
    rows = model.shared.weight.shape[0]
    if tokenizer.vocab_size > rows:
        raise CheckpointMismatchError(
            f"The tokenizer ({tokenizer.source}) has {tokenizer.vocab_size} tokens but the text encoder's "
            f"embedding has only {rows} rows: they do not belong together. Use the T5 tokenizer of the release."
        )
    identity = f"{build.identity}|tokenizer={tokenizer.source}|dtype={dtype}"
    return T5TextEncoder(model, tokenizer, identity=identity, max_length=max_length, cache_size=cache_size)


class _T5Build(NamedTuple):
    """What is needed to build a T5 encoder: its config, where the tensors are, how their names map."""

    config: object  # transformers.T5Config
    files: list[Path]
    rename: dict[str, str]  # file key -> model key, only for the tensors to load
    scales: dict[str, str]  # model key -> file key of its fp8 scale (scaled-fp8 files only)
    identity: str


def _files_identity(files: list[Path]) -> str:
    parts = []
    for path in files:
        stat = path.stat()
        parts.append(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}")
    return ";".join(parts)


def _folder_t5(folder: Path) -> _T5Build:
    """A diffusers/transformers `text_encoder/` folder: config.json + (sharded) weights."""
    from transformers import T5Config

    config_file = folder / "config.json"
    if not config_file.is_file():
        raise LayoutError(
            f"'{folder}' is neither an EasyAnimate release folder (no text_encoder/) nor a text_encoder/ "
            "folder (no config.json). Point to the release folder or to a single-file T5 encoder."
        )
    config_dict = read_json_config(config_file, what="text encoder config")
    model_type = config_dict.get("model_type")
    if model_type != "t5":
        raise LayoutError(
            f"'{config_file}' describes a '{model_type}' model; EasyAnimate needs the T5 v1.1 encoder "
            "(model_type 't5') of its release."
        )
    files = weight_files(folder, stem="model")
    keys: dict[str, list[int]] = {}
    for path in files:
        keys.update(file_key_shapes(path))
    # Encoder-decoder checkpoints also hold the decoder and the LM head; only the encoder is loaded.
    rename = {k: k for k in keys if k == "shared.weight" or k.startswith("encoder.")}
    _tie_embedding_names(rename)
    # The config's sizes against the weights before anything is built (a claimed 20000 layers is refused here).
    config = T5Config.from_dict(config_dict)
    embed = keys.get("shared.weight") or keys.get("encoder.embed_tokens.weight") or [None, None]
    check_config_against_weights(f"The text encoder config '{config_file}'", [
        ("num_layers", config.num_layers, count_indexed(keys, "encoder.block.")),
        ("d_model", config.d_model, embed[1]),
        ("vocab_size", config.vocab_size, embed[0]),
    ], str(files[0] if len(files) == 1 else folder))
    return _T5Build(config, files, rename, {}, _files_identity(files))


def _tie_embedding_names(rename: dict[str, str]) -> None:
    """The token embedding is stored as `shared.weight`, sometimes also (or only) as the encoder's."""
    tied = [k for k, v in rename.items() if v == "encoder.embed_tokens.weight"]
    if "shared.weight" in rename.values():
        for key in tied:
            del rename[key]
    else:
        for key in tied:
            rename[key] = "shared.weight"


def _single_file_t5(path: Path) -> _T5Build:
    """A single-file T5 encoder (ComfyUI / Flux / SD3 style); its config is read off the tensor shapes."""
    from transformers import T5Config

    shapes = file_key_shapes(path)
    prefix = next((k[: -len(_T5_MARKER)] for k in shapes if k.endswith(_T5_MARKER)), None)
    if prefix is None:
        raise LayoutError(_not_t5_message(path, shapes))
    local = {k[len(prefix):]: v for k, v in shapes.items() if k.startswith(prefix)}

    def shape(key: str) -> list[int]:
        if key not in local:
            raise LayoutError(f"'{path.name}' looks like a T5 encoder but lacks '{prefix}{key}': the file is incomplete.")
        return local[key]

    embed_key = "shared.weight" if "shared.weight" in local else "encoder.embed_tokens.weight"
    vocab_size, d_model = shape(embed_key)
    num_layers = 1 + max(int(k.split(".")[2]) for k in local if k.startswith("encoder.block."))
    if "encoder.block.1.layer.0.SelfAttention.relative_attention_bias.weight" in local:
        raise LayoutError(
            f"'{path.name}' is a UMT5 encoder (position bias in every layer, as used by Wan); EasyAnimate "
            "was trained with T5 v1.1 XXL. Use t5xxl_fp16.safetensors or the release's text_encoder/."
        )
    buckets, num_heads = shape("encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight")
    inner_dim = shape("encoder.block.0.layer.0.SelfAttention.q.weight")[0]
    gated = "encoder.block.0.layer.1.DenseReluDense.wi_0.weight" in local
    d_ff = shape("encoder.block.0.layer.1.DenseReluDense." + ("wi_0" if gated else "wi") + ".weight")[0]
    config = T5Config(
        vocab_size=vocab_size, d_model=d_model, d_kv=inner_dim // num_heads, d_ff=d_ff, num_layers=num_layers,
        num_heads=num_heads, relative_attention_num_buckets=buckets, relative_attention_max_distance=128,
        # T5 v1.1 (what Flux/SD3/PixArt use) is gated-gelu; the original T5 is relu.
        feed_forward_proj="gated-gelu" if gated else "relu", layer_norm_epsilon=1e-6, dropout_rate=0.0,
        tie_word_embeddings=False, is_encoder_decoder=False, use_cache=False,
    )
    rename = {
        prefix + k: k for k in local
        if (k == "shared.weight" or k.startswith("encoder.")) and not k.endswith((".scale_weight", ".scale_input"))
    }
    _tie_embedding_names(rename)
    # "Scaled fp8" files store weight / scale in fp8 and the scale beside it: real weight = fp8 * scale.
    scales = {}
    if prefix + "scaled_fp8" in shapes:
        for k in local:
            if k.endswith(".scale_weight"):
                scales[k[: -len(".scale_weight")] + ".weight"] = prefix + k
    return _T5Build(config, [path], rename, scales, _files_identity([path]))


def _not_t5_message(path: Path, shapes: dict[str, list[int]]) -> str:
    """Name what the file is when it is not a T5 encoder, so the user picks the right one."""
    def has(fragment: str) -> bool:
        return any(fragment in k for k in shapes)

    if has("text_model.encoder.layers.") or has("transformer.resblocks.") or has("text_projection"):
        layers = {k.split("layers.")[1].split(".")[0] for k in shapes if "text_model.encoder.layers." in k}
        kind = {12: "CLIP-L", 24: "CLIP-H", 32: "CLIP-G"}.get(len(layers), "CLIP")
        return (
            f"'{path.name}' is a {kind} text encoder, not T5. EasyAnimate conditions on T5-XXL (4096-wide "
            "embeddings): pick t5xxl_fp16.safetensors / t5xxl_fp8_e4m3fn.safetensors, or the release's text_encoder/."
        )
    if has("model.layers."):
        return f"'{path.name}' is a decoder language model (Llama/Qwen/Gemma style), not a T5 encoder."
    if has("diffusion_model.") or has("transformer_blocks."):
        return f"'{path.name}' is a diffusion model, not a text encoder. Pick a T5-XXL encoder file."
    return (
        f"'{path.name}' is not a T5 encoder: no tensor named '*{_T5_MARKER}'. It holds {describe_keys(shapes)}. "
        "Pick t5xxl_fp16.safetensors / t5xxl_fp8_e4m3fn.safetensors, or an EasyAnimate release folder."
    )


def _build_t5(build: _T5Build, *, dtype: torch.dtype, device) -> torch.nn.Module:
    """transformers' T5EncoderModel, built without storage and filled with the file's tensors.

    Each tensor is read, converted and placed before the next is read, so peak memory is the model in
    `dtype` plus one tensor. Like transformers' `from_pretrained`, the feed-forward output projections
    (`_keep_in_fp32_modules`, i.e. `wo`) stay in float32 when computing in float16, where T5-XXL's large
    activations would otherwise overflow.
    """
    from transformers import T5EncoderModel

    with torch.device("meta"):
        model = T5EncoderModel(build.config)
    keep_fp32 = set(getattr(model, "_keep_in_fp32_modules_strict", None) or ()) if dtype in (torch.float16, torch.bfloat16) else set()
    if dtype == torch.float16:
        keep_fp32 |= set(getattr(model, "_keep_in_fp32_modules", None) or ())

    def target_dtype(key: str) -> torch.dtype:
        return torch.float32 if keep_fp32.intersection(key.split(".")) else dtype

    scale_values = {}
    if build.scales:
        scale_values = dict(iter_safetensors(build.files[0], keys=list(build.scales.values())))

    def tensors():
        for path in build.files:
            if path.suffix in SAFETENSORS_SUFFIXES:
                wanted = [k for k in file_key_shapes(path) if k in build.rename]
                stream = iter_safetensors(path, keys=wanted)
            else:
                stream = iter_file(path)
            for file_key, tensor in stream:
                key = build.rename.get(file_key)
                if key is None:
                    continue
                if key in build.scales:
                    tensor = tensor.to(torch.float32) * scale_values[build.scales[key]].to(torch.float32)
                if tensor.is_floating_point():
                    tensor = tensor.to(target_dtype(key))
                yield key, tensor

    source = ", ".join(p.name for p in build.files)
    assign_tensors(model, tensors(), dtype=None, device=device, source=source)
    model.set_input_embeddings(model.shared)  # the encoder's token embedding is the shared one
    missing = meta_tensors(model)
    if missing:
        raise CheckpointMismatchError(
            f"{source}: the T5 encoder is incomplete, these tensors are missing: {describe_keys(missing)}. "
            "Re-download the file(s)."
        )
    return model.eval().requires_grad_(False)


# ==================================================================================================
# 4. The encoder with its cache
# ==================================================================================================


class TextEmbeddings(NamedTuple):
    """T5 conditioning for a batch: embeddings (B, L, D) in the encoder dtype, masks (B, L) int64.

    The negative fields are None when no negative prompt was asked for. For classifier-free guidance
    the pipeline concatenates [negative, positive] on the batch axis, as the reference does.
    `unknown_words` / `negative_unknown_words`: the words of the (cleaned) prompts that the tokenizer's
    vocabulary lacks, so the model cannot follow them (`describe_unknown_words` tells the user which).
    """

    embeds: torch.Tensor
    mask: torch.Tensor
    negative_embeds: torch.Tensor | None = None
    negative_mask: torch.Tensor | None = None
    unknown_words: tuple[str, ...] = ()
    negative_unknown_words: tuple[str, ...] = ()


def describe_unknown_words(words: Sequence[str]) -> str:
    """Which prompt words the model ignores, in words: `the model's vocabulary has no "xyz"; ...`."""
    quoted = ", ".join(f'"{word}"' for word in words)
    ignored = "that word is ignored" if len(words) == 1 else "those words are ignored"
    return f"the model's vocabulary has no {quoted}; {ignored}"


class T5TextEncoder:
    """A loaded T5 encoder + tokenizer that turns prompts into EasyAnimate text conditioning.

    Results are cached per (cleaned prompt, max_length, encoder identity) in a small LRU owned by this
    object; each prompt is encoded on its own (batch of one), so an embedding never depends on which
    other prompts were encoded with it or on what was already cached. Cached tensors live on the CPU;
    `encode` returns CPU tensors. If you change the weights in place (e.g. merge a LoRA into T5), call
    `clear_cache()`.
    """

    def __init__(self, model: torch.nn.Module, tokenizer: T5PromptTokenizer, *, identity: str,
                 max_length: int = DEFAULT_MAX_LENGTH, cache_size: int = 16):
        self.model = model
        self.tokenizer = tokenizer
        self.identity = identity
        self.max_length = max_length
        self.cache_size = cache_size
        self._cache: OrderedDict[tuple, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()

    @property
    def dtype(self) -> torch.dtype:
        return self.model.shared.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.model.shared.weight.device

    @property
    def hidden_size(self) -> int:
        """Width of the embeddings (4096 for T5-XXL); must equal the transformer's `caption_channels`."""
        return self.model.config.d_model

    def to(self, device) -> "T5TextEncoder":
        self.model.to(device)
        return self

    def activation_bytes(self, batch: int = 1) -> int:
        """Estimated peak activation memory of encoding `batch` prompts: a layer's token activations
        (hidden state, attention projections, the gated feed-forward's two inner halves) and its attention
        scores with the position bias (T5's attention keeps the full matrix). The one estimate the hosts
        load the encoder with."""
        cfg = self.model.config
        tokens, element = self.max_length, torch.finfo(self.dtype).bits // 8 if self.dtype.is_floating_point else 4
        hidden = batch * tokens * (4 * cfg.d_model + 2 * cfg.d_ff) * element
        scores = 2 * batch * cfg.num_heads * tokens * tokens * element
        return int(hidden + scores)

    def clear_cache(self) -> None:
        self._cache.clear()

    def encode(
        self,
        prompts: str | Sequence[str],
        negative_prompts: str | Sequence[str] | None = None,
        *,
        clean_caption: bool = True,
        max_length: int | None = None,
    ) -> TextEmbeddings:
        """Embeddings and masks for `prompts` and, if given, `negative_prompts`.

        A single negative string is used for every prompt (as the reference does); a list must have
        one entry per prompt. `clean_caption` applies the reference caption cleaner to both.
        """
        prompts = _prompt_list(prompts, "prompt")
        embeds, mask = self.encode_prompts(prompts, clean_caption=clean_caption, max_length=max_length)
        unknown = self._warn_unknown_words(prompts, clean_caption, "prompt")
        if negative_prompts is None:
            return TextEmbeddings(embeds, mask, unknown_words=unknown)
        if isinstance(negative_prompts, str):
            negative_prompts = [negative_prompts] * len(prompts)
        negative_prompts = _prompt_list(negative_prompts, "negative prompt")
        if len(negative_prompts) != len(prompts):
            raise EasyAnimateError(
                f"Got {len(prompts)} prompts but {len(negative_prompts)} negative prompts; give one negative "
                "prompt per prompt, or a single string for all."
            )
        negative_embeds, negative_mask = self.encode_prompts(
            negative_prompts, clean_caption=clean_caption, max_length=max_length
        )
        negative_unknown = self._warn_unknown_words(negative_prompts, clean_caption, "negative prompt")
        return TextEmbeddings(embeds, mask, negative_embeds, negative_mask, unknown, negative_unknown)

    def unknown_words(self, prompts: str | Sequence[str], *, clean_caption: bool = True) -> tuple[str, ...]:
        """The words of the prompts, cleaned as `encode` cleans them, that the tokenizer's vocabulary
        lacks, each once, in order. Only the tokenizer runs, not the model."""
        words: list[str] = []
        for prompt in _prompt_list(prompts, "prompt"):
            for word in self.tokenizer.unknown_words(preprocess_prompt(prompt, clean_caption)):
                if word not in words:
                    words.append(word)
        return tuple(words)

    def _warn_unknown_words(self, prompts: list[str], clean_caption: bool, what: str) -> tuple[str, ...]:
        # A small vocabulary (the demo model's) turns whole words into <unk>; without this the prompt
        # would just not be followed, with no hint why.
        words = self.unknown_words(prompts, clean_caption=clean_caption)
        if words:
            logger.warning("In the %s, %s.", what, describe_unknown_words(words))
        return words

    def encode_prompts(self, prompts: str | Sequence[str], *, clean_caption: bool = True,
                       max_length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(embeds (B, L, D), mask (B, L) int64) for a list of prompts."""
        max_length = self.max_length if max_length is None else int(max_length)
        if max_length < 1:
            raise EasyAnimateError(f"max_length must be at least 1 token, got {max_length}.")
        rows = [self._encode_one(preprocess_prompt(p, clean_caption), max_length) for p in _prompt_list(prompts, "prompt")]
        return torch.stack([r[0] for r in rows]), torch.stack([r[1] for r in rows])

    def _encode_one(self, text: str, max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
        key = (text, max_length, self.identity)
        cached = self._cache.get(key)
        if cached is not None:
            self._cache.move_to_end(key)
            return cached
        input_ids, mask = self.tokenizer([text], max_length)
        with torch.no_grad():
            hidden = self.model(input_ids=input_ids.to(self.device), attention_mask=mask.to(self.device)).last_hidden_state
        result = (hidden[0].to(device="cpu", dtype=self.dtype), mask[0])
        if self.cache_size > 0:
            self._cache[key] = result
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return result


def _prompt_list(prompts, what: str) -> list[str]:
    if isinstance(prompts, str):
        return [prompts]
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise EasyAnimateError(f"A {what} must be a string or a non-empty list of strings, got {prompts!r}.")
    for p in prompts:
        if not isinstance(p, str):
            raise EasyAnimateError(f"Every {what} must be a string, got {type(p).__name__}. Use \"\" for an empty one.")
    return list(prompts)
