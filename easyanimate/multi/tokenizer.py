"""A word-level BERT tokenizer for the synthetic vocabulary (the tiny configuration: a word-level tokenizer
over a ~200-word synthetic vocabulary).

    tokenizer = build_tokenizer(vocabulary_words(), folder)   # writes vocab.txt + tokenizer.json
    tokenizer = load_tokenizer(folder)                        # transformers BertTokenizerFast

Ids 0-4 are [PAD] [UNK] [CLS] [SEP] [MASK] (BERT's names, not its ids); every other id is one whole word.
The object is a `transformers` BERT fast tokenizer (lower-casing, punctuation split, pair encoding
`[CLS] a [SEP] b [SEP]` with token type ids), so a released BERT vocabulary works through the same code.
Built from a `tokenizers` object instead of `vocab_file`, which works with transformers 4.x and 5.x.
"""
from __future__ import annotations

from pathlib import Path

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def _bert_class():
    try:
        from transformers import BertTokenizerFast
    except ImportError:  # pragma: no cover - transformers 5 names the fast one BertTokenizer
        from transformers import BertTokenizer as BertTokenizerFast
    return BertTokenizerFast


def _bert_normalizer():
    from tokenizers import normalizers

    return normalizers.BertNormalizer(lowercase=True, clean_text=True, handle_chinese_chars=True)


def _split_words(texts) -> list[str]:
    """Words and punctuation marks as the tokenizer itself will see them: normalised (lower-cased, accents
    stripped) and split by the same BERT normalizer and pre-tokenizer, so every vocabulary entry is a unit
    the tokenizer can look up ("Café" is the word "cafe", not "caf" + "é")."""
    from tokenizers import pre_tokenizers

    normalizer, pre_tokenizer = _bert_normalizer(), pre_tokenizers.BertPreTokenizer()
    return [word for text in texts for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text))]


def build_tokenizer(words, folder=None):
    """A tokenizer whose vocabulary is the specials + the distinct `words` (in first-seen order, or
    sentences: they are split into words). Written to `folder` (vocab.txt, tokenizer.json,
    tokenizer_config.json) when given."""
    vocab: dict[str, int] = {}
    for token in list(SPECIAL_TOKENS) + _split_words(words):
        vocab.setdefault(token, len(vocab))
    tokenizer = _from_vocab(vocab)
    if folder is not None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tokenizer.save_pretrained(str(folder))
        (folder / "vocab.txt").write_text("".join(w + "\n" for w in sorted(vocab, key=vocab.get)))
    return tokenizer


def _from_vocab(vocab: dict):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    core = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]", max_input_chars_per_word=100))
    core.normalizer = _bert_normalizer()
    core.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    cls, sep = vocab["[CLS]"], vocab["[SEP]"]
    core.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    core.decoder = decoders.WordPiece()
    return _bert_class()(tokenizer_object=core, unk_token="[UNK]", sep_token="[SEP]", pad_token="[PAD]",
                         cls_token="[CLS]", mask_token="[MASK]", do_lower_case=True)


def load_tokenizer(folder):
    """The tokenizer saved in `folder` (tokenizer.json; a plain BERT `vocab.txt` folder also works)."""
    folder = Path(folder)
    if not (folder / "tokenizer.json").is_file() and not (folder / "vocab.txt").is_file():
        raise FileNotFoundError(f"no tokenizer in '{folder}' (expected tokenizer.json or vocab.txt)")
    if not (folder / "tokenizer.json").is_file():  # a bare vocab.txt: rebuild the word-level tokenizer
        lines = (folder / "vocab.txt").read_text().splitlines()
        return _from_vocab({w: i for i, w in enumerate(lines)})
    return _bert_class().from_pretrained(str(folder))


def special_ids(tokenizer) -> list[int]:
    return sorted(set(tokenizer.all_special_ids))
