"""V5.1 prompt encoding parity: our Qwen2-VL text encoder vs the reference's `encode_prompt`.

For every fixture case of kind `text_encoder`: load the case folder (its tiny `text_encoder/` and
`tokenizer/` in the release layout) with `load_text_encoder_v5`, encode the recorded prompts and negative
prompts, and compare the token ids and masks exactly and the embeddings within the case's tolerance.
The prompts, the sequence length and every size come from the case files.
"""
import json
import re

import pytest
import torch

from conftest import fixture_cases, fixtures_dir, load_tensors, rel_error, rel_tolerance
from easyanimate.text_v5 import Qwen2VLTextEncoder, load_text_encoder_v5


def _find_key(value, key):
    """The first value stored under `key` anywhere in a JSON tree, or None."""
    if isinstance(value, dict):
        if key in value:
            return value[key]
        value = list(value.values())
    if isinstance(value, list):
        for item in value:
            found = _find_key(item, key)
            if found is not None:
                return found
    return None


def _max_sequence_length(meta: dict, prompts: dict) -> int:
    """The `max_sequence_length` of the recorded call: a field of meta.json or prompts.json, or the
    argument written in meta.json's description of the call."""
    for source in (meta, prompts):
        value = _find_key(source, "max_sequence_length")
        if isinstance(value, int):
            return value
    match = re.search(r"max_sequence_length\s*=\s*(\d+)", json.dumps(meta))
    assert match, "the case records no max_sequence_length"
    return int(match.group(1))


@pytest.mark.parametrize("case", fixture_cases("text_encoder"))
def test_v5_text_encoding_matches_reference(case):
    case_dir = fixtures_dir() / case
    meta = json.loads((case_dir / "meta.json").read_text())
    prompts = json.loads((case_dir / "prompts.json").read_text())
    recorded = load_tensors(case_dir / "io.safetensors")
    max_length = _max_sequence_length(meta, prompts)

    encoder = load_text_encoder_v5(case_dir, dtype="fp32")
    assert isinstance(encoder, Qwen2VLTextEncoder), f"{case}: expected a Qwen2-VL (V5.1) text encoder"

    if "chat_texts" in prompts:
        assert [encoder.chat_text(p) for p in prompts["prompts"]] == prompts["chat_texts"]
    input_ids, attention_mask = encoder.tokenize(prompts["prompts"], max_length)
    for key, ours in (("debug.input_ids", input_ids), ("debug.attention_mask", attention_mask)):
        if key in recorded:  # debug tensors are optional in a fixture set
            assert torch.equal(ours, recorded[key]), f"{case}: {key} differs"

    text = encoder.encode(prompts["prompts"], prompts["negative_prompts"], max_length=max_length)
    assert torch.equal(text.mask, recorded["output.prompt_attention_mask"]), f"{case}: prompt mask differs"
    assert torch.equal(text.negative_mask, recorded["output.negative_prompt_attention_mask"]), \
        f"{case}: negative prompt mask differs"
    for key, ours in (("output.prompt_embeds", text.embeds), ("output.negative_prompt_embeds", text.negative_embeds)):
        reference = recorded[key]
        assert ours.shape == reference.shape, f"{case}: {key} shape {tuple(ours.shape)} != {tuple(reference.shape)}"
        error, tolerance = rel_error(ours, reference), rel_tolerance(case, key)
        print(f"{case} {key}: rel {error:.2e} (tolerance {tolerance:.0e})")
        assert error <= tolerance, f"{case}: {key} rel error {error:.3e} > {tolerance:.0e}"
