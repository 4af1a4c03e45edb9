"""Prompt encoding for EasyAnimate V5.1 (Qwen2-VL) and V5 (Bert + mT5).

The V1–V3 releases condition on T5-XXL (`easyanimate/text.py`). The later releases changed the text
side completely:

* **V5.1** conditions its transformer on **Qwen2-VL-7B-Instruct**, a decoder-only language model. Each
  prompt is wrapped in the tokenizer's chat template as one user turn (the template inserts its default
  system turn; `add_generation_prompt=True` appends the assistant header), tokenised to exactly 256
  tokens (truncated on the right, padded on the right, attention mask), and run through the decoder;
  the embedding is the **input of the last decoder layer** (`hidden_states[-2]` in transformers' terms:
  not the final-normed output). Positions are `0 … 255` for every token, padding included.
* **V5** conditions on two encoders: HunyuanDiT's bilingual **Bert** text tower (77 tokens,
  `[CLS] … [SEP]`, `[PAD]`) and the **mT5-XL** encoder (256 tokens, `</s>` appended). Both run
  **without** an attention mask (the V5 transformer is configured with `enable_text_attention_mask
  false`, so the reference calls the encoders on the token ids alone); their masks are still returned.

Neither cleans captions (V1–V3's DeepFloyd cleaner is not applied): Chinese and English prompts go in as
typed.

Loading follows `text.py`: transformers' own model classes, built on the `meta` device and filled tensor
by tensor in the requested dtype from the release's (sharded) safetensors, so the weights never exist
twice. For Qwen2-VL only the language model is built (`Qwen2VLTextModel`): the vision tower (`visual.*`)
and the LM head (`lm_head.weight`) are never read, and neither are the last decoder layer and the final
norm, whose output the embedding does not use. `storage="fp8"` keeps the linear layers' weights as
float8 e4m3fn with a float32 scale per output row (`memory.Fp8Linear`), upcast one layer at a time while
computing; tensors stored as float8 in the files are upcast to the compute dtype otherwise.

Typical use::

    encoder = load_text_encoder_v5("models/easyanimate/EasyAnimateV5.1-12b-zh", dtype="bf16", device="cuda")
    text = encoder.encode("a cat walking in the snow", negative_prompts="blurry, low quality")
    text.embeds, text.mask                 # V5.1: (1, 256, 3584), (1, 256)
    # V5: text.bert.embeds (1, 77, 1024), text.t5.embeds (1, 256, 2048), each with its mask
    encoder.release()                      # drop the weights; cached prompts stay available

transformers is imported inside the functions that need it, so importing this module is cheap.
"""
from __future__ import annotations

import logging
import os
from collections import OrderedDict
from pathlib import Path
from typing import Callable, Iterator, NamedTuple, Sequence

import torch
from torch import nn

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
from .text import (
    T5PromptTokenizer,
    TextEmbeddings,
    _files_identity,
    _prompt_list,
    _tie_embedding_names,
    describe_unknown_words,
)

logger = logging.getLogger(__name__)

# The reference's `actual_max_sequence_length`: a prompt gets min(tokenizer's model_max_length, 256)
# tokens (Qwen2-VL and mT5: 256; HunyuanDiT's Bert tokenizer says 77).
DEFAULT_MAX_LENGTH = 256

_FP8_DTYPES = tuple(getattr(torch, name) for name in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, name))


class V5TextEmbeddings(NamedTuple):
    """V5 conditioning: the Bert embeddings (B, 77, 1024) and the mT5 embeddings (B, 256, 2048), each a
    `TextEmbeddings` with its masks and its negative prompt's. The transformer takes both (Bert first)."""

    bert: TextEmbeddings
    t5: TextEmbeddings


# ==================================================================================================
# Loading
# ==================================================================================================


def parse_storage(storage) -> str | None:
    """None (weights in the compute dtype) or "fp8" (linear weights as float8 e4m3fn with row scales)."""
    if storage is None or str(storage).lower() in ("", "none", "default"):
        return None
    if str(storage).lower() in ("fp8", "fp8_e4m3fn", "float8_e4m3fn"):
        if not _FP8_DTYPES:
            raise EasyAnimateError("This torch has no float8_e4m3fn dtype; fp8 weights need torch >= 2.1.")
        return "fp8"
    raise ValueError(f"Unknown weight storage '{storage}'; use None or 'fp8'.")


def detect_text_encoder_v5(release: str | os.PathLike) -> str:
    """"v5.1" (Qwen2-VL in `text_encoder/`) or "v5" (Bert in `text_encoder/` + T5 in `text_encoder_2/`),
    read from the folders' configs; anything else is refused, naming what was found."""
    release = Path(release)
    if not release.is_dir():
        raise LayoutError(f"EasyAnimate release folder '{release}' does not exist or is not a folder.")
    config_file = release / "text_encoder" / "config.json"
    if not config_file.is_file():
        if (release / "config.json").is_file():
            raise LayoutError(
                f"'{release}' holds a config.json but no text_encoder/ folder: pass the release folder (the one "
                "with text_encoder/ and tokenizer/), not a model folder inside it."
            )
        raise LayoutError(
            f"'{release}' has no text_encoder/config.json: it is not a complete EasyAnimate V5/V5.1 release. "
            "Download the release's text_encoder/ and tokenizer/ folders."
        )
    model_type = read_json_config(config_file, what="text encoder config").get("model_type")
    second_file = release / "text_encoder_2" / "config.json"
    second = read_json_config(second_file, what="text encoder config").get("model_type") if second_file.is_file() else None
    if model_type == "qwen2_vl":
        return "v5.1"
    if model_type == "bert":
        if second in ("t5", "mt5"):
            return "v5"
        if second is None:
            raise LayoutError(
                f"'{release}': text_encoder/ is a Bert model (the V5 layout) but text_encoder_2/config.json (the "
                "mT5 encoder V5 also needs) is missing. Download the release's text_encoder_2/ and tokenizer_2/."
            )
        raise LayoutError(
            f"'{release}': text_encoder/ is a Bert model but text_encoder_2/ holds a '{second}' model; EasyAnimate "
            "V5 pairs Bert with the mT5 encoder (model_type 'mt5' or 't5'). This combination is not supported."
        )
    if model_type == "t5":
        raise LayoutError(
            f"'{release}': text_encoder/ holds a T5 encoder (model_type 't5'): an EasyAnimate V1–V3 (or PixArt) "
            "release. Load it with easyanimate.text.load_text_encoder."
        )
    found = f"a '{model_type}' model" if model_type else "a config without model_type"
    raise LayoutError(
        f"'{config_file}' describes {found}. EasyAnimate V5.1 uses Qwen2-VL (model_type 'qwen2_vl') and V5 "
        "uses Bert (model_type 'bert') with mT5 in text_encoder_2/; this is neither."
    )


def load_text_encoder_v5(
    release: str | os.PathLike,
    *,
    dtype: torch.dtype | str = torch.bfloat16,
    device: torch.device | str = "cpu",
    storage: str | None = None,
    cache_size: int = 16,
) -> "Qwen2VLTextEncoder | BertMT5TextEncoder":
    """The text encoder(s) of an EasyAnimate V5.1 or V5 release folder, told apart by their configs.

    `dtype` is the compute dtype (bf16, fp16 or fp32; the reference runs the encoders in the working
    dtype). `storage="fp8"` stores the linear layers' weights as float8 e4m3fn (row-scaled) and upcasts
    them one layer at a time. Only local files are read; nothing is downloaded or executed.
    """
    kind = detect_text_encoder_v5(release)
    if kind == "v5.1":
        return load_qwen2vl_encoder(release, dtype=dtype, device=device, storage=storage, cache_size=cache_size)
    return load_bert_mt5_encoder(release, dtype=dtype, device=device, storage=storage, cache_size=cache_size)


def load_qwen2vl_encoder(
    release: str | os.PathLike,
    *,
    dtype: torch.dtype | str = torch.bfloat16,
    device: torch.device | str = "cpu",
    storage: str | None = None,
    cache_size: int = 16,
) -> "Qwen2VLTextEncoder":
    """V5.1: the Qwen2-VL language model of `release/text_encoder/` with the tokenizer of `tokenizer/`
    (or, in the `-diffusers` layout, the tokenizer files inside `text_encoder/`)."""
    dtype, storage = parse_dtype(dtype), parse_storage(storage)
    release = Path(release)
    folder = release / "text_encoder"
    tokenizer_folder = _qwen_tokenizer_folder(release)
    tokenizer = _load_qwen_tokenizer(tokenizer_folder, folder)
    model, files = _build_qwen(folder, dtype=dtype, device=device, storage=storage,
                               tokens=(f"The tokenizer ({tokenizer_folder})", len(tokenizer)))
    identity = f"{_files_identity(files)}|tokenizer={tokenizer_folder.resolve()}|dtype={dtype}|storage={storage}"
    return Qwen2VLTextEncoder(model, tokenizer, identity=identity, storage=storage, cache_size=cache_size)


def load_bert_mt5_encoder(
    release: str | os.PathLike,
    *,
    dtype: torch.dtype | str = torch.bfloat16,
    device: torch.device | str = "cpu",
    storage: str | None = None,
    cache_size: int = 16,
) -> "BertMT5TextEncoder":
    """V5: Bert (`text_encoder/` + `tokenizer/` vocab.txt) and the mT5 encoder (`text_encoder_2/` +
    `tokenizer_2/` spiece.model)."""
    dtype, storage = parse_dtype(dtype), parse_storage(storage)
    release = Path(release)
    bert_tokenizer = _load_bert_tokenizer(release / "tokenizer")
    t5_tokenizer, t5_tokenizer_config = _load_mt5_tokenizer(release / "tokenizer_2")
    bert, bert_files = _build_bert(release / "text_encoder", dtype=dtype, device=device, storage=storage,
                                   tokens=(f"The Bert tokenizer ({release / 'tokenizer'})", len(bert_tokenizer)))
    # mT5: the sentencepiece vocabulary; sentinel ids beyond it only matter if a prompt spells one out.
    t5, t5_files = _build_mt5(release / "text_encoder_2", dtype=dtype, device=device, storage=storage,
                              tokens=(f"The mT5 tokenizer ({t5_tokenizer.source})", t5_tokenizer.sp.get_piece_size()))
    bert_length = min(int(getattr(bert_tokenizer, "model_max_length", DEFAULT_MAX_LENGTH)), DEFAULT_MAX_LENGTH)
    t5_length = min(_model_max_length(t5_tokenizer_config), DEFAULT_MAX_LENGTH)
    identity = (
        f"{_files_identity(bert_files)}|{_files_identity(t5_files)}|tokenizers={(release / 'tokenizer').resolve()},"
        f"{(release / 'tokenizer_2').resolve()}|dtype={dtype}|storage={storage}"
    )
    return BertMT5TextEncoder(
        bert, t5, bert_tokenizer, t5_tokenizer, identity=identity, storage=storage,
        max_lengths=(bert_length, t5_length), cache_size=cache_size,
    )


# --------------------------------------------------------------------------------------------------
# Tokenizers
# --------------------------------------------------------------------------------------------------


def _qwen_tokenizer_folder(release: Path) -> Path:
    for folder in (release / "tokenizer", release / "text_encoder"):
        if (folder / "tokenizer.json").is_file() or (folder / "vocab.json").is_file():
            return folder
    raise LayoutError(
        f"'{release}' has no Qwen2-VL tokenizer: expected tokenizer/ with tokenizer.json (or vocab.json and "
        "merges.txt). The download is incomplete: fetch the release's tokenizer/ folder."
    )


def _load_qwen_tokenizer(folder: Path, model_folder: Path):
    """transformers' Qwen2 tokenizer from local files, set to pad and truncate on the right, with the chat
    template of the folder (tokenizer_config.json, chat_template.jinja, or the release's chat_template.json)."""
    from transformers import Qwen2Tokenizer  # the class the reference loads (its Python version before transformers 5)

    try:
        tokenizer = Qwen2Tokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as err:  # transformers reports unreadable tokenizer files in many ways
        raise LayoutError(f"Cannot load the Qwen2-VL tokenizer in '{folder}': {err}") from None
    tokenizer.padding_side = "right"
    tokenizer.truncation_side = "right"
    if not getattr(tokenizer, "chat_template", None):
        for candidate in (folder / "chat_template.json", model_folder / "chat_template.json"):
            if candidate.is_file():
                template = read_json_config(candidate, what="chat template").get("chat_template")
                if isinstance(template, str) and template:
                    tokenizer.chat_template = template
                    break
    if not getattr(tokenizer, "chat_template", None):
        raise LayoutError(
            f"The tokenizer in '{folder}' has no chat template (none in tokenizer_config.json, chat_template.jinja "
            "or chat_template.json). EasyAnimate V5.1 wraps every prompt in Qwen2-VL's chat template: restore the "
            "release's tokenizer files."
        )
    if tokenizer.pad_token_id is None:
        raise LayoutError(f"The tokenizer in '{folder}' defines no pad token; the release's defines <|endoftext|>.")
    return tokenizer


def _load_bert_tokenizer(folder: Path):
    """The WordPiece tokenizer of the reference: transformers' Python `BertTokenizer` (named
    `BertTokenizerLegacy` since transformers 5, where `BertTokenizer` is the Rust one)."""
    import transformers

    if not (folder / "vocab.txt").is_file():
        raise LayoutError(
            f"No Bert tokenizer at '{folder}': expected vocab.txt (EasyAnimate V5 keeps it in tokenizer/). "
            "Download the release's tokenizer/ folder."
        )
    cls = getattr(transformers, "BertTokenizerLegacy", None) or transformers.BertTokenizer
    try:
        tokenizer = cls.from_pretrained(str(folder), local_files_only=True)
    except Exception as err:
        raise LayoutError(f"Cannot load the Bert tokenizer in '{folder}': {err}") from None
    tokenizer.padding_side = "right"
    tokenizer.truncation_side = "right"
    return tokenizer


def _load_mt5_tokenizer(folder: Path) -> tuple[T5PromptTokenizer, dict]:
    if not (folder / "spiece.model").is_file():
        raise LayoutError(
            f"No mT5 tokenizer at '{folder}': expected spiece.model (EasyAnimate V5 keeps it in tokenizer_2/). "
            "Download the release's tokenizer_2/ folder."
        )
    config_file = folder / "tokenizer_config.json"
    config = read_json_config(config_file, what="tokenizer config") if config_file.is_file() else {}
    if config.get("legacy") is False:
        logger.warning(
            "%s sets legacy=false; prompts are tokenised in T5's legacy mode (identical unless a prompt contains "
            "special tokens such as </s>).", config_file,
        )
    return T5PromptTokenizer.from_path(folder), config


def _model_max_length(tokenizer_config: dict) -> int:
    value = tokenizer_config.get("model_max_length")
    return int(value) if isinstance(value, (int, float)) and value >= 1 else DEFAULT_MAX_LENGTH


# --------------------------------------------------------------------------------------------------
# Models: transformers' classes built on meta, filled tensor by tensor
# --------------------------------------------------------------------------------------------------


def _read_folder(folder: Path, what: str, types: tuple[str, ...]) -> tuple[dict, list[Path], dict[str, list[int]]]:
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise LayoutError(f"'{folder}' has no config.json; the release's {what} folder is incomplete.")
    config = read_json_config(config_file, what=f"{what} config")
    if config.get("model_type") not in types:
        raise LayoutError(
            f"'{config_file}' describes a '{config.get('model_type')}' model; the {what} of EasyAnimate V5/V5.1 "
            f"is model_type {' or '.join(repr(t) for t in types)}."
        )
    files = weight_files(folder, stem="model")
    keys: dict[str, list[int]] = {}
    for path in files:
        keys.update(file_key_shapes(path))
    return config, files, keys


def _check_vocabulary(tokens: tuple[str, int], rows: int) -> None:
    """Refuse a tokenizer with more tokens than the embedding has rows, before anything is built."""
    name, size = tokens
    if size > rows:
        raise CheckpointMismatchError(
            f"{name} has {size} tokens but its text encoder's embedding has only {rows} rows: they do not belong "
            "together. Use the tokenizer folders of the same release."
        )


def _build_qwen(folder: Path, *, dtype, device, storage, tokens: tuple[str, int]) -> tuple[nn.Module, list[Path]]:
    from transformers import Qwen2VLConfig
    from transformers.models.qwen2_vl import modeling_qwen2_vl

    config_dict, files, keys = _read_folder(folder, "Qwen2-VL text encoder", ("qwen2_vl",))
    config = Qwen2VLConfig.from_dict(config_dict)
    # transformers >= 4.52 nests the language model's settings in `text_config` (the release's flat config
    # is read into it); before that the flat config itself describes the language model.
    text_config = getattr(config, "text_config", None) or config
    # The language model without the vision tower: `Qwen2VLTextModel`; older transformers call it
    # `Qwen2VLModel` (embed_tokens, layers, norm: the same names).
    model_class = getattr(modeling_qwen2_vl, "Qwen2VLTextModel", None) or modeling_qwen2_vl.Qwen2VLModel
    # Release files name the language model `model.*`; files saved by transformers 4.52–4.x `model.language_model.*`.
    prefix = "model.language_model." if any(k.startswith("model.language_model.") for k in keys) else "model."
    embed = keys.get(prefix + "embed_tokens.weight")
    if embed is None:
        raise LayoutError(
            f"'{folder}' holds no Qwen2-VL language model: no tensor '{prefix}embed_tokens.weight' among "
            f"{describe_keys(keys)}. Re-download the release's text_encoder/."
        )
    layers = text_config.num_hidden_layers
    check_config_against_weights(f"The text encoder config '{folder / 'config.json'}'", [
        ("num_hidden_layers", layers, count_indexed(keys, prefix + "layers.")),
        ("hidden_size", text_config.hidden_size, embed[1]),
        ("vocab_size", text_config.vocab_size, embed[0]),
    ], str(folder))
    _check_vocabulary(tokens, embed[0])
    # The embedding is the input of the last decoder layer: that layer and the final norm are not built.
    unused = (f"{prefix}layers.{layers - 1}.", f"{prefix}norm.")
    rename = {k: k[len(prefix):] for k in keys if k.startswith(prefix) and not k.startswith(unused)}

    def without_last_layer(model: nn.Module) -> None:
        model.layers = model.layers[: layers - 1]
        model.norm = nn.Identity()

    model = _build(
        lambda: model_class(text_config), files, rename, dtype=dtype, device=device, config=text_config,
        fp8=(lambda name, module: name.startswith("layers.")) if storage == "fp8" else None,
        prepare=without_last_layer, source=str(folder),
    )
    return model, files


def _build_bert(folder: Path, *, dtype, device, storage, tokens: tuple[str, int]) -> tuple[nn.Module, list[Path]]:
    from transformers import BertConfig, BertModel

    config_dict, files, keys = _read_folder(folder, "Bert text encoder", ("bert",))
    config = BertConfig.from_dict(config_dict)
    prefix = "bert." if "bert.embeddings.word_embeddings.weight" in keys else ""
    embed = keys.get(prefix + "embeddings.word_embeddings.weight")
    if embed is None:
        raise LayoutError(
            f"'{folder}' holds no Bert model: no tensor 'embeddings.word_embeddings.weight' among {describe_keys(keys)}."
        )
    positions = keys.get(prefix + "embeddings.position_embeddings.weight", [None])[0]
    check_config_against_weights(f"The text encoder config '{folder / 'config.json'}'", [
        ("num_hidden_layers", config.num_hidden_layers, count_indexed(keys, prefix + "encoder.layer.")),
        ("hidden_size", config.hidden_size, embed[1]),
        ("vocab_size", config.vocab_size, embed[0]),
        ("max_position_embeddings", config.max_position_embeddings, positions),
    ], str(folder))
    _check_vocabulary(tokens, embed[0])
    # Only the encoder's outputs are used: the pooler (and any pre-training heads) are not loaded.
    # Old files also store the position-id buffer, which is computed instead.
    rename = {
        k: k[len(prefix):] for k in keys
        if k.startswith(prefix) and k[len(prefix):].startswith(("embeddings.", "encoder."))
        and not k.endswith(("position_ids", "token_type_ids"))
    }
    model = _build(
        lambda: BertModel(config, add_pooling_layer=False), files, rename, dtype=dtype, device=device,
        config=config, fp8=(lambda name, module: name.startswith("encoder.")) if storage == "fp8" else None,
        source=str(folder),
    )
    return model, files


def _build_mt5(folder: Path, *, dtype, device, storage, tokens: tuple[str, int]) -> tuple[nn.Module, list[Path]]:
    from transformers import T5Config, T5EncoderModel

    config_dict, files, keys = _read_folder(folder, "mT5 text encoder", ("mt5", "t5"))
    # The reference loads it with `T5EncoderModel.from_pretrained`, i.e. through T5Config whatever the
    # model_type says (the two differ only in defaults for fields the release's config sets).
    config = T5Config.from_dict({k: v for k, v in config_dict.items() if k != "model_type"})
    embed = keys.get("shared.weight") or keys.get("encoder.embed_tokens.weight")
    if embed is None:
        raise LayoutError(f"'{folder}' holds no T5 encoder: no 'shared.weight' among {describe_keys(keys)}.")
    gated = any(k.endswith("DenseReluDense.wi_0.weight") for k in keys)
    check_config_against_weights(f"The text encoder config '{folder / 'config.json'}'", [
        ("num_layers", config.num_layers, count_indexed(keys, "encoder.block.")),
        ("d_model", config.d_model, embed[1]),
        ("vocab_size", config.vocab_size, embed[0]),
        ("feed_forward_proj (gated)", config.is_gated_act, gated),
    ], str(folder))
    _check_vocabulary(tokens, embed[0])
    rename = {k: k for k in keys if k == "shared.weight" or k.startswith("encoder.")}
    _tie_embedding_names(rename)

    def tie(model: nn.Module) -> None:
        model.set_input_embeddings(model.shared)  # the encoder's token embedding is the shared one

    # T5's feed-forward casts its input to the dtype of `wo`'s weight, so `wo` keeps the compute dtype.
    model = _build(
        lambda: T5EncoderModel(config), files, rename, dtype=dtype, device=device, config=config,
        fp8=(lambda name, module: name.startswith("encoder.block.") and not name.endswith(".wo")) if storage == "fp8" else None,
        finish=tie, source=str(folder),
    )
    return model, files


def _build(
    make: Callable[[], nn.Module],
    files: list[Path],
    rename: dict[str, str],
    *,
    dtype: torch.dtype,
    device,
    config,
    source: str,
    fp8: Callable[[str, nn.Module], bool] | None = None,
    prepare: Callable[[nn.Module], None] | None = None,
    finish: Callable[[nn.Module], None] | None = None,
) -> nn.Module:
    """A transformers model built without storage and filled with the files' tensors.

    Every weight is cast to `dtype` (the reference loads its text encoders in the working dtype) as it is
    read, and placed on `device` before the next one is read, so peak memory is the model plus one tensor.
    Linear layers chosen by `fp8` get float8 e4m3fn weights with a float32 scale per output row instead.
    """
    with torch.device("meta"):
        model = make()
    if prepare is not None:
        prepare(model)
    fp8_weights = _make_fp8_linears(model, fp8) if fp8 is not None else set()
    device = torch.device(device)

    def tensors() -> Iterator[tuple[str, torch.Tensor]]:
        for path in files:
            if path.suffix in SAFETENSORS_SUFFIXES:
                stream = iter_safetensors(path, keys=[k for k in file_key_shapes(path) if k in rename])
            else:
                stream = iter_file(path)
            for file_key, tensor in stream:
                key = rename.get(file_key)
                if key is None:
                    continue
                if key in fp8_weights:
                    yield from _fp8_tensors(key, tensor.to(device))
                elif tensor.is_floating_point():
                    yield key, tensor.to(dtype)
                else:
                    yield key, tensor

    _, unexpected = assign_tensors(model, tensors(), dtype=None, device=device, source=source)
    if unexpected:
        raise CheckpointMismatchError(
            f"{source}: the installed transformers' model has no place for {describe_keys(unexpected)}; these "
            "weights do not fit the model class."
        )
    if finish is not None:
        finish(model)
    _materialise_buffers(model, config, device)
    missing = meta_tensors(model)
    if missing:
        raise CheckpointMismatchError(
            f"{source}: the text encoder is incomplete, these tensors are missing: {describe_keys(missing)}. "
            "Re-download the file(s)."
        )
    return model.eval().requires_grad_(False)


def _make_fp8_linears(model: nn.Module, chosen: Callable[[str, nn.Module], bool]) -> set[str]:
    """Turn the chosen (still empty) `nn.Linear`s into `Fp8Linear`s; returns their weights' names."""
    from .memory import Fp8Linear

    names = set()
    for name, module in model.named_modules():
        if type(module) is nn.Linear and chosen(name, module):
            module.__class__ = Fp8Linear
            module.register_buffer("weight_scale", torch.empty(module.out_features, 1, device="meta"))
            names.add(f"{name}.weight")
    return names


def _fp8_tensors(key: str, weight: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
    from .memory import fp8_quantize

    if weight.dtype == torch.float8_e4m3fn:  # already fp8 in the file: kept as it is, scale 1
        scale = torch.ones(weight.shape[0], 1, dtype=torch.float32, device=weight.device)
        q = weight
    else:
        q, scale = fp8_quantize(weight)
    yield key, q
    yield key[: -len("weight")] + "weight_scale", scale


def _materialise_buffers(model: nn.Module, config, device: torch.device) -> None:
    """Give the buffers that are computed, not stored (none of them is in the files), their values:
    rotary-embedding tables are rebuilt from the config, position ids are `arange`, token type ids 0."""
    for module_name, module in list(model.named_modules()):
        meta = [name for name, buffer in module._buffers.items() if buffer is not None and buffer.is_meta]
        if not meta:
            continue
        if "inv_freq" in meta and not any(True for _ in module.parameters(recurse=False)):
            parent_name, _, child = module_name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            parent._modules[child] = type(module)(config=config).to(device)
            continue
        for name in meta:
            shape = module._buffers[name].shape
            if name.endswith("position_ids"):
                value = torch.arange(shape[-1]).expand(shape).contiguous()
            elif name == "token_type_ids":
                value = torch.zeros(shape, dtype=torch.long)
            else:
                continue  # left on meta: reported as missing
            module._buffers[name] = value.to(device)


# ==================================================================================================
# The encoders
# ==================================================================================================


class _PromptCache:
    """A small LRU of per-prompt results (CPU tensors), owned by one encoder."""

    def __init__(self, size: int):
        self.size = size
        self._items: OrderedDict[tuple, tuple] = OrderedDict()

    def get(self, key: tuple):
        value = self._items.get(key)
        if value is not None:
            self._items.move_to_end(key)
        return value

    def put(self, key: tuple, value: tuple) -> None:
        if self.size <= 0:
            return
        self._items[key] = value
        while len(self._items) > self.size:
            self._items.popitem(last=False)

    def clear(self) -> None:
        self._items.clear()

    def __len__(self) -> int:
        return len(self._items)


def _negative_list(negative_prompts, count: int) -> list[str]:
    if isinstance(negative_prompts, str):
        return [negative_prompts] * count
    negatives = _prompt_list(negative_prompts, "negative prompt")
    if len(negatives) != count:
        raise EasyAnimateError(
            f"Got {count} prompts but {len(negatives)} negative prompts; give one negative prompt per prompt, or "
            "a single string for all."
        )
    return negatives


def _check_length(max_length) -> int:
    max_length = int(max_length)
    if max_length < 1:
        raise EasyAnimateError(f"max_length must be at least 1 token, got {max_length}.")
    return max_length


def _element_bytes(dtype: torch.dtype) -> int:
    return torch.finfo(dtype).bits // 8 if dtype.is_floating_point else 4


class _Encoder:
    """What both encoders share: the model to place (`model`), the cache, moving and releasing."""

    model: nn.Module | None

    def __init__(self, identity: str, storage: str | None, cache_size: int):
        self.identity = identity
        self.storage = storage
        self.cache_size = cache_size
        self._cache = _PromptCache(cache_size)
        self._dtype: torch.dtype | None = None

    def to(self, device) -> "_Encoder":
        """Move the weights (e.g. `to("cpu")` after encoding to free the GPU); returns self."""
        self._loaded().to(device)
        return self

    def release(self) -> None:
        """Drop the weights (their memory is freed once nothing else holds them). Prompts already in the cache
        can still be encoded; any other prompt needs the encoder loaded again."""
        self.model = None

    @property
    def released(self) -> bool:
        return self.model is None

    def clear_cache(self) -> None:
        self._cache.clear()

    def _loaded(self) -> nn.Module:
        if self.model is None:
            raise EasyAnimateError(
                "This text encoder was released (its weights were dropped after encoding) and the prompt is not in "
                "its cache; load the text encoder again to encode new prompts."
            )
        return self.model


class Qwen2VLTextEncoder(_Encoder):
    """EasyAnimate V5.1 prompt encoding: Qwen2-VL's language model with the chat template.

    `model` is transformers' Qwen2-VL language model without its last decoder layer and final norm, so
    its `last_hidden_state` is the reference's `hidden_states[-2]`. Each prompt is encoded on its own
    (batch of one) and cached per (prompt, max_length, encoder identity); results are CPU tensors in the
    compute dtype. `encode` returns `TextEmbeddings`.
    """

    def __init__(self, model: nn.Module, tokenizer, *, identity: str, storage: str | None = None,
                 max_length: int | None = None, cache_size: int = 16):
        super().__init__(identity, storage, cache_size)
        self.model = model
        self.tokenizer = tokenizer
        self.config = model.config
        self._dtype = model.embed_tokens.weight.dtype
        self.max_length = _check_length(max_length) if max_length is not None else min(
            int(getattr(tokenizer, "model_max_length", DEFAULT_MAX_LENGTH)), DEFAULT_MAX_LENGTH)

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype (also with fp8 weight storage)."""
        return self._dtype

    @property
    def device(self) -> torch.device:
        return self._loaded().embed_tokens.weight.device

    @property
    def hidden_size(self) -> int:
        """Width of the embeddings (3584 for Qwen2-VL-7B); the V5.1 transformer's text input width."""
        return self.config.hidden_size

    def activation_bytes(self, batch: int = 1, max_length: int | None = None) -> int:
        """Estimated peak activation memory of encoding `batch` prompts: one decoder layer's token
        activations (residual and normed states, q/k/v/o projections, the gated MLP's three inner tensors),
        the attention scores (computed in full where no fused kernel is used) and the causal mask, and with
        fp8 storage one layer's weight upcast. The one estimate the hosts load the encoder with."""
        cfg, element = self.config, _element_bytes(self.dtype)
        tokens = self.max_length if max_length is None else _check_length(max_length)
        heads = cfg.num_attention_heads
        kv = getattr(cfg, "num_key_value_heads", heads) * (cfg.hidden_size // heads)
        hidden = batch * tokens * (5 * cfg.hidden_size + 2 * kv + 3 * cfg.intermediate_size) * element
        scores = 2 * batch * heads * tokens * tokens * element + batch * tokens * tokens * element
        upcast = 0
        if self.storage == "fp8":
            from .memory import FP8_UPCAST_BYTES

            upcast = min(FP8_UPCAST_BYTES, cfg.hidden_size * cfg.intermediate_size * element)
        return int(hidden + scores + upcast)

    def chat_text(self, prompt: str) -> str:
        """The prompt as the model reads it: one user turn in the chat template, the template's default
        system turn before it and the assistant header after it."""
        messages = [{"role": "user", "content": [{"type": "text", "text": prompt}]}]
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def tokenize(self, prompts: str | Sequence[str], max_length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids, attention_mask), int64 (len(prompts), max_length): each prompt templated on its own,
        truncated and padded on the right."""
        max_length = self.max_length if max_length is None else _check_length(max_length)
        texts = [self.chat_text(p) for p in _prompt_list(prompts, "prompt")]
        for text in texts:
            ids = self.tokenizer(text, verbose=False).input_ids
            if len(ids) > max_length:
                logger.warning(
                    "Prompt is longer than %d tokens (chat template included); this part is cut off: %r",
                    max_length, self.tokenizer.decode(ids[max_length:]),
                )
        inputs = self.tokenizer(texts, padding="max_length", max_length=max_length, truncation=True,
                                return_attention_mask=True, return_tensors="pt")
        return inputs["input_ids"].long(), inputs["attention_mask"].long()

    def encode(self, prompts: str | Sequence[str], negative_prompts: str | Sequence[str] | None = None, *,
               max_length: int | None = None) -> TextEmbeddings:
        """Embeddings and masks for `prompts` and, if given, `negative_prompts` (encoded separately, each
        padded to its own full length). A single negative string is used for every prompt."""
        prompts = _prompt_list(prompts, "prompt")
        embeds, mask = self.encode_prompts(prompts, max_length=max_length)
        if negative_prompts is None:
            return TextEmbeddings(embeds, mask)
        negative_embeds, negative_mask = self.encode_prompts(_negative_list(negative_prompts, len(prompts)),
                                                             max_length=max_length)
        return TextEmbeddings(embeds, mask, negative_embeds, negative_mask)

    def encode_prompts(self, prompts: str | Sequence[str], *, max_length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(embeds (B, L, D) in the compute dtype, mask (B, L) int64), on the CPU."""
        max_length = self.max_length if max_length is None else _check_length(max_length)
        rows = [self._encode_one(p, max_length) for p in _prompt_list(prompts, "prompt")]
        return torch.stack([r[0] for r in rows]), torch.stack([r[1] for r in rows])

    def _encode_one(self, prompt: str, max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
        key = (prompt, max_length, self.identity)
        cached = self._cache.get(key)
        if cached is not None:
            return cached
        model = self._loaded()
        input_ids, mask = self.tokenize([prompt], max_length)
        device = self.device
        # Text-only input: every token, padding included, at position arange(L) in all three M-RoPE rows.
        positions = torch.arange(max_length, device=device).view(1, 1, -1).expand(3, 1, -1)
        with torch.no_grad():
            hidden = model(input_ids=input_ids.to(device), attention_mask=mask.to(device), position_ids=positions,
                           use_cache=False).last_hidden_state
        result = (hidden[0].to(device="cpu", dtype=self.dtype), mask[0])
        self._cache.put(key, result)
        return result


class BertMT5TextEncoder(_Encoder):
    """EasyAnimate V5 prompt encoding: HunyuanDiT's Bert text tower and the mT5-XL encoder.

    `model` is an `nn.ModuleDict` holding both (`bert`, `t5`), so a host places them as one component.
    Both run on the token ids alone (no attention mask), as the reference does for V5; the masks are
    returned beside the embeddings. Results are cached per (prompt, lengths, encoder identity).
    """

    def __init__(self, bert: nn.Module, t5: nn.Module, bert_tokenizer, t5_tokenizer: T5PromptTokenizer, *,
                 identity: str, storage: str | None = None, max_lengths: tuple[int, int] = (77, DEFAULT_MAX_LENGTH),
                 cache_size: int = 16):
        super().__init__(identity, storage, cache_size)
        self.model = nn.ModuleDict({"bert": bert, "t5": t5})
        self.bert_tokenizer = bert_tokenizer
        self.t5_tokenizer = t5_tokenizer
        self.bert_config, self.t5_config = bert.config, t5.config
        self._dtype = bert.embeddings.word_embeddings.weight.dtype
        self.max_lengths = (_check_length(max_lengths[0]), _check_length(max_lengths[1]))

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    @property
    def device(self) -> torch.device:
        return self._loaded()["bert"].embeddings.word_embeddings.weight.device

    @property
    def hidden_sizes(self) -> tuple[int, int]:
        """Widths of the two embeddings (1024 and 2048 in the release)."""
        return self.bert_config.hidden_size, self.t5_config.d_model

    def activation_bytes(self, batch: int = 1) -> int:
        """Estimated peak activation memory of encoding `batch` prompts: the larger of the two encoders'
        layer activations and attention scores (they run one after the other), plus the first one's output
        kept meanwhile."""
        element = _element_bytes(self.dtype)
        (bert_tokens, t5_tokens), bert, t5 = self.max_lengths, self.bert_config, self.t5_config
        bert_work = (batch * bert_tokens * (5 * bert.hidden_size + 2 * bert.intermediate_size)
                     + 2 * batch * bert.num_attention_heads * bert_tokens * bert_tokens) * element
        t5_work = (batch * t5_tokens * (4 * t5.d_model + 2 * t5.d_ff)
                   + 2 * batch * t5.num_heads * t5_tokens * t5_tokens) * element
        upcast = 0
        if self.storage == "fp8":
            from .memory import FP8_UPCAST_BYTES

            upcast = min(FP8_UPCAST_BYTES, max(bert.hidden_size * bert.intermediate_size, t5.d_model * t5.d_ff) * element)
        return int(max(bert_work, t5_work) + batch * bert_tokens * bert.hidden_size * element + upcast)

    def tokenize(self, prompts: str | Sequence[str], max_lengths: tuple[int | None, int | None] | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(bert_ids, bert_mask, t5_ids, t5_mask), int64: `[CLS] … [SEP]` padded with `[PAD]` to 77, and
        the mT5 pieces with `</s>` padded with `<pad>` to 256 (both truncated on the right)."""
        bert_length, t5_length = self._lengths(max_lengths)
        prompts = _prompt_list(prompts, "prompt")
        for prompt in prompts:
            ids = self.bert_tokenizer(prompt, verbose=False).input_ids
            if len(ids) > bert_length:
                logger.warning("Prompt is longer than the Bert encoder's %d tokens; this part is cut off: %r",
                               bert_length, self.bert_tokenizer.decode(ids[bert_length - 1:-1]))
        bert = self.bert_tokenizer(prompts, padding="max_length", max_length=bert_length, truncation=True,
                                   return_attention_mask=True, return_tensors="pt")
        t5_ids, t5_mask = self.t5_tokenizer(prompts, t5_length)
        return bert["input_ids"].long(), bert["attention_mask"].long(), t5_ids, t5_mask

    def unknown_words(self, prompts: str | Sequence[str]) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """The words of the prompts that each vocabulary cannot spell (Bert's `[UNK]`, mT5's `<unk>`)."""
        bert_words: list[str] = []
        t5_words: list[str] = []
        unk = self.bert_tokenizer.unk_token
        # Bert's basic tokenizer splits at white space and punctuation and around every CJK character;
        # WordPiece then spells each of those words or gives [UNK] for the whole word.
        basic = getattr(self.bert_tokenizer, "basic_tokenizer", None)
        for prompt in _prompt_list(prompts, "prompt"):
            for word in (basic.tokenize(prompt) if basic is not None else prompt.split()):
                if word not in bert_words and unk in self.bert_tokenizer.tokenize(word):
                    bert_words.append(word)
            for word in self.t5_tokenizer.unknown_words(prompt):
                if word not in t5_words:
                    t5_words.append(word)
        return tuple(bert_words), tuple(t5_words)

    def encode(self, prompts: str | Sequence[str], negative_prompts: str | Sequence[str] | None = None, *,
               max_lengths: tuple[int | None, int | None] | None = None) -> V5TextEmbeddings:
        """Both encoders' embeddings and masks for `prompts` and, if given, `negative_prompts` (a single
        negative string is used for every prompt). The reference's V5 pipeline uses "" when no negative
        prompt is given; pass it explicitly for that."""
        prompts = _prompt_list(prompts, "prompt")
        rows = self.encode_prompts(prompts, max_lengths=max_lengths)
        unknown = self._warn_unknown_words(prompts, "prompt")
        if negative_prompts is None:
            return V5TextEmbeddings(TextEmbeddings(rows[0], rows[1], unknown_words=unknown[0]),
                                    TextEmbeddings(rows[2], rows[3], unknown_words=unknown[1]))
        negatives = _negative_list(negative_prompts, len(prompts))
        negative = self.encode_prompts(negatives, max_lengths=max_lengths)
        negative_unknown = self._warn_unknown_words(negatives, "negative prompt")
        return V5TextEmbeddings(
            TextEmbeddings(rows[0], rows[1], negative[0], negative[1], unknown[0], negative_unknown[0]),
            TextEmbeddings(rows[2], rows[3], negative[2], negative[3], unknown[1], negative_unknown[1]),
        )

    def _warn_unknown_words(self, prompts: list[str], what: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
        words = self.unknown_words(prompts)
        for found, encoder in zip(words, ("Bert", "mT5")):
            if found:
                logger.warning("In the %s, %s (%s encoder).", what, describe_unknown_words(found), encoder)
        return words

    def encode_prompts(self, prompts: str | Sequence[str], *, max_lengths: tuple[int | None, int | None] | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(bert_embeds (B, 77, 1024), bert_mask, t5_embeds (B, 256, 2048), t5_mask) on the CPU."""
        lengths = self._lengths(max_lengths)
        rows = [self._encode_one(p, lengths) for p in _prompt_list(prompts, "prompt")]
        return tuple(torch.stack([r[i] for r in rows]) for i in range(4))

    def _lengths(self, max_lengths) -> tuple[int, int]:
        if max_lengths is None:
            return self.max_lengths
        return tuple(default if value is None else _check_length(value)
                     for value, default in zip(max_lengths, self.max_lengths))

    def _encode_one(self, prompt: str, lengths: tuple[int, int]):
        key = (prompt, lengths, self.identity)
        cached = self._cache.get(key)
        if cached is not None:
            return cached
        model = self._loaded()
        bert_ids, bert_mask, t5_ids, t5_mask = self.tokenize([prompt], lengths)
        device = self.device
        with torch.no_grad():
            bert = model["bert"](input_ids=bert_ids.to(device)).last_hidden_state
            t5 = model["t5"](input_ids=t5_ids.to(device)).last_hidden_state
        result = (bert[0].to(device="cpu", dtype=self.dtype), bert_mask[0],
                  t5[0].to(device="cpu", dtype=self.dtype), t5_mask[0])
        self._cache.put(key, result)
        return result
