"""T5 Encode with ComfyUI's native CLIP: ComfyUI's own T5 module, run by our node, equals transformers' T5.

A full T5-XXL file cannot be made here, so ComfyUI's T5 class is built with tiny sizes and wrapped the way
a CLIP loaded from a T5-XXL file is (`cond_stage_model.t5xxl.transformer`, `tokenizer.t5xxl.tokenizer`,
`patcher`). Runs in ComfyUI's interpreter when `COMFYUI_DIR` is set; skipped with the reason otherwise.
"""
import pytest

from comfyui_script import COMFYUI_DIR, run_comfyui_script
from conftest import ROOT

pytestmark = pytest.mark.skipif(not COMFYUI_DIR, reason="COMFYUI_DIR is not set: no ComfyUI to take the T5 module from")

SCRIPT = r"""
import importlib.util, sys
sys.path.insert(0, sys.argv[1])
import comfy.cli_args
comfy.cli_args.args.cpu = True
import torch
import comfy.model_patcher, comfy.ops, comfy.text_encoders.t5 as t5
from transformers import T5Config, T5EncoderModel, T5TokenizerFast

spec = importlib.util.spec_from_file_location("easyanimate_pack", sys.argv[2] + "/__init__.py",
                                              submodule_search_locations=[sys.argv[2]])
pack = importlib.util.module_from_spec(spec); sys.modules["easyanimate_pack"] = pack; spec.loader.exec_module(pack)

config = dict(d_model=16, d_kv=8, num_heads=2, d_ff=32, num_layers=2, vocab_size=32128,
              dense_act_fn="gelu_pytorch_tanh", is_gated_act=True, model_type="t5")
model = t5.T5(config, dtype=torch.float32, device="cpu", operations=comfy.ops.manual_cast)
g = torch.Generator().manual_seed(0)
with torch.no_grad():
    for p in model.parameters():
        p.copy_(torch.randn(p.shape, generator=g) * 0.5 + (1.0 if p.ndim == 1 else 0.0))

class Holder: pass
clip = Holder(); clip.cond_stage_model = Holder(); clip.cond_stage_model.t5xxl = Holder()
clip.cond_stage_model.t5xxl.transformer = model
clip.tokenizer = Holder(); clip.tokenizer.t5xxl = Holder()
tokenizer = T5TokenizerFast.from_pretrained(sys.argv[1] + "/comfy/text_encoders/t5_tokenizer")
clip.tokenizer.t5xxl.tokenizer = tokenizer
clip.patcher = comfy.model_patcher.ModelPatcher(model, load_device=torch.device("cpu"), offload_device=torch.device("cpu"))

node = pack.nodes.NODE_CLASS_MAPPINGS["EasyAnimateT5Encode"]()
embeds = node.encode("A <b>Cat</b> walking in the snow, https://example.com", "blurry, ugly", True, clip=clip)[0]

reference = T5EncoderModel(T5Config(d_model=16, d_kv=8, num_heads=2, d_ff=32, num_layers=2, vocab_size=32128,
                                    feed_forward_proj="gated-gelu", dropout_rate=0.0)).eval()
state = dict(model.state_dict()); state["encoder.embed_tokens.weight"] = state["shared.weight"]
reference.load_state_dict(state)
clean = pack.easyanimate.text.preprocess_prompt
for cond, text in ((embeds.positive, "A <b>Cat</b> walking in the snow, https://example.com"), (embeds.negative, "blurry, ugly")):
    tokens = tokenizer([clean(text, True)], padding="max_length", max_length=120, truncation=True, return_tensors="pt")
    with torch.no_grad():
        expected = reference(tokens["input_ids"], attention_mask=tokens["attention_mask"]).last_hidden_state
    assert torch.equal(cond.mask, tokens["attention_mask"]), "mask differs"
    assert cond.embeds.shape == (1, 120, 16), cond.embeds.shape
    err = ((cond.embeds - expected).abs().max() / expected.abs().max()).item()
    assert err < 1e-5, err
    print("rel error", err)
print("ok")
"""


def test_native_t5_clip_encodes_like_transformers_t5(tmp_path):
    print(run_comfyui_script(tmp_path, "native_t5.py", SCRIPT, ROOT))
