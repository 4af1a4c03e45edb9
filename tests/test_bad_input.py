"""Bad input to the model core is refused early, clearly and without losing anything.

Resource limits checked before allocating (image pixel counts, configs against weight shapes),
non-finite inputs and LoRA weights, VAE input shapes, config files that cannot be read, safetensors
headers that contradict themselves, and legacy torch files (plain tensors load, code never runs).
Limits are set low through parameters; nothing here allocates more than a few megabytes.
"""
import json
import math
import os
import pickle
import struct
import time
import zlib
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from easyanimate.checkpoint import (
    check_config_against_weights, count_indexed, load_legacy, read_json_config, safetensors_keys,
)
from easyanimate.errors import (
    MAX_SEED, CheckpointMismatchError, CorruptCheckpointError, EasyAnimateError, LayoutError, check_finite, check_seed,
)
from easyanimate.image_encoder import resize_like_pil
from easyanimate.images import MAX_IMAGE_PIXELS, check_image_pixels, read_image
from easyanimate.loading import load_transformer
from release import TINY_VAE, write_text_encoder, write_vae
from tiny import full_state_dict, random_model, tiny_config_dict, write_folder


# ------------------------------------------------------------------------------------------ helpers
def png_header_only(path: Path, width: int, height: int) -> Path:
    """A PNG whose header claims width x height RGB pixels, followed by a tiny (invalid) data chunk: what a
    decompression bomb looks like to a reader that only opens it."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))
    return path


def small_png(path: Path, width=40, height=30) -> Path:
    from PIL import Image

    Image.new("RGB", (width, height), (200, 30, 60)).save(path)
    return path


@pytest.fixture(scope="module")
def v3_state():
    return full_state_dict(random_model("v3"))


# ------------------------------------------------------------------ 1. resource limits before allocating
def test_image_pixel_limit_is_checked_before_decoding(tmp_path, monkeypatch):
    from PIL import ImageFile

    path = small_png(tmp_path / "start.png", 40, 30)

    def no_decoding(self):
        raise AssertionError("the image was decoded before its size was checked")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    with pytest.raises(EasyAnimateError, match=r"40x30 pixels.*over the limit of 0.001 megapixels"):
        read_image(path, max_pixels=1000)


def test_decompression_bomb_header_is_refused_with_the_default_limit(tmp_path):
    bomb = png_header_only(tmp_path / "bomb.png", 12000, 12000)
    assert bomb.stat().st_size < 200
    with pytest.raises(EasyAnimateError, match=r"12000x12000 pixels \(144\.0 megapixels\).*limit of 64 megapixels"):
        read_image(bomb)
    assert MAX_IMAGE_PIXELS == 64_000_000
    with pytest.raises(EasyAnimateError, match="limit of 64 megapixels"):
        check_image_pixels(12000, 12000)


def test_start_image_is_resized_while_still_8_bit(tmp_path):
    path = small_png(tmp_path / "start.png", 120, 90)
    image = read_image(path, size=(16, 32))
    assert image.shape == (1, 3, 16, 32) and image.dtype == torch.float32
    assert 0 <= float(image.min()) and float(image.max()) <= 1
    torch.testing.assert_close(image[0, :, 8, 16], torch.tensor([200, 30, 60]) / 255, rtol=0, atol=1 / 255)
    same = read_image(path)
    assert same.shape == (1, 3, 90, 120)
    shrunk = resize_like_pil(torch.zeros(2, 90, 120, 3, dtype=torch.uint8), 16, 32)
    assert shrunk.shape == (2, 16, 32, 3) and shrunk.dtype == torch.uint8


@pytest.mark.parametrize("kind", ["missing", "folder", "not_an_image", "truncated", "device"])
def test_start_image_that_is_not_an_image(tmp_path, kind):
    if kind == "missing":
        path, words = tmp_path / "nope.png", "does not exist"
    elif kind == "folder":
        path, words = tmp_path, "is a folder"
    elif kind == "not_an_image":
        path, words = tmp_path / "notes.png", "not an image file"
        path.write_text("hello")
    elif kind == "truncated":
        path, words = tmp_path / "cut.png", "damaged or truncated"
        full = small_png(tmp_path / "full.png", 64, 64).read_bytes()
        path.write_bytes(full[: len(full) // 2])
    else:
        path, words = Path(os.devnull), "not a regular file"
        if not path.exists():
            pytest.skip("no null device")
    with pytest.raises(EasyAnimateError, match=words):
        read_image(path)


def test_transformer_config_claiming_20000_layers_is_refused_before_building(tmp_path, v3_state, monkeypatch):
    import easyanimate.loading as loading

    def never(*args, **kwargs):
        raise AssertionError("the model was built before the config was checked")

    folder = write_folder(tmp_path / "transformer", tiny_config_dict("v3", num_layers=20000), v3_state)
    monkeypatch.setattr(loading, "EasyAnimateTransformer3D", never)
    started = time.time()
    with pytest.raises(CheckpointMismatchError) as error:
        load_transformer(folder)
    assert time.time() - started < 5
    message = str(error.value)
    assert "config.json" in message and "num_layers = 20000, but the weights hold 16" in message


@pytest.mark.parametrize("change,words", [
    (dict(num_attention_heads=4), r"num_attention_heads x attention_head_dim \(4 x 16\) = 64, but the weights hold 32"),
    (dict(in_channels=4), "in_channels = 4, but the weights hold 12"),
    (dict(caption_channels=4096), "caption_channels = 4096, but the weights hold 24"),
])
def test_transformer_config_sizes_are_compared_with_the_weights(tmp_path, v3_state, change, words):
    folder = write_folder(tmp_path, tiny_config_dict("v3", **change), v3_state)
    with pytest.raises(CheckpointMismatchError, match=words):
        load_transformer(folder)


def test_config_given_as_argument_is_named(tmp_path, v3_state):
    path = tmp_path / "model.safetensors"
    save_file(v3_state, str(path))
    config = tmp_path / "my_config.json"
    config.write_text(json.dumps(tiny_config_dict("v3", num_layers=200000)))
    with pytest.raises(CheckpointMismatchError, match=r"my_config.json.*num_layers = 200000, but the weights hold 16"):
        load_transformer(path, config=config)


@pytest.mark.parametrize("change,words", [
    (dict(layers_per_block=20000), "layers_per_block = 20000, but the weights hold 2"),
    (dict(ch_mult=[1] * 20000), r"block widths\) = \[8, 8, 8, 8, 8, 8, \.\.\. \(20000 entries\)\], but the weights hold \[8, 16, 32, 32\]"),
    (dict(ch=16), r"\[16, 32, 64, 64\], but the weights hold \[8, 16, 32, 32\]"),
])
def test_vae_config_sizes_are_compared_with_the_weights(tmp_path, change, words, monkeypatch):
    import easyanimate.vae as vae_module
    from easyanimate.vae import load_vae

    write_vae(tmp_path / "vae")
    config_file = tmp_path / "vae" / "config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), **change}))
    monkeypatch.setattr(vae_module, "build_vae", lambda *a, **k: pytest.fail("built before checking"))
    with pytest.raises(CheckpointMismatchError, match=words) as error:
        load_vae(tmp_path)
    assert str(config_file) in str(error.value)


def test_t5_config_claiming_20000_layers_is_refused_before_building(tmp_path):
    from easyanimate.text import load_text_encoder

    write_text_encoder(tmp_path / "text_encoder")
    config_file = tmp_path / "text_encoder" / "config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "num_layers": 20000}))
    started = time.time()
    with pytest.raises(CheckpointMismatchError, match=r"text_encoder/config.json.*num_layers = 20000, but the weights hold 2"):
        load_text_encoder(tmp_path / "text_encoder")
    assert time.time() - started < 10


def test_config_check_helpers():
    assert count_indexed(["blocks.0.a", "blocks.11.b", "blocks.x.c", "other.3.d"], "blocks.") == 12
    assert count_indexed([], "blocks.") == 0
    check_config_against_weights("cfg", [("a", 1, 1), ("b", 5, None)], "w")  # None: the weights do not tell
    with pytest.raises(CheckpointMismatchError, match="cfg does not describe the weights in 'w': a = 2, but the weights hold 1"):
        check_config_against_weights("cfg", [("a", 2, 1)], "w")


# ------------------------------------------------------------------ 3. non-finite values, seeds
def test_check_finite():
    ok = torch.ones(3)
    assert check_finite(ok, "x") is ok
    assert check_finite(torch.arange(3), "ints") is not None
    with pytest.raises(EasyAnimateError, match=r"start image holds 1 non-finite value \(NaN\)"):
        check_finite(torch.tensor([0.0, float("nan")]), "start image")
    with pytest.raises(EasyAnimateError, match=r"2 non-finite values \(NaN and infinity\)"):
        check_finite(torch.tensor([float("inf"), float("nan")], dtype=torch.bfloat16), "frames")


def test_check_seed():
    assert check_seed(0) == 0 and check_seed(MAX_SEED) == MAX_SEED == 2**63 - 1
    torch.Generator().manual_seed(MAX_SEED + 2)  # the pipeline's derived seeds still fit torch
    for bad in (-1, 2**64 - 1, MAX_SEED + 1, 1.5, "abc"):
        with pytest.raises(EasyAnimateError, match=f"from 0 to {MAX_SEED}"):
            check_seed(bad)


# ------------------------------------------------------------------ 4. VAE input shapes
@pytest.fixture(scope="module")
def vae():
    from easyanimate.vae import build_vae

    torch.manual_seed(0)
    return build_vae("v3", TINY_VAE)


@pytest.mark.parametrize("shape,words", [
    ((1, 16, 2, 4, 4), r"C = 4 channels; got shape \(1, 16, 2, 4, 4\).*V5 16"),
    ((1, 4, 4, 4), r"got shape \(1, 4, 4, 4\).*frame axis"),
])
def test_decode_refuses_wrong_latent_shapes(vae, shape, words):
    for decode in (vae.decode_video, vae.decode):
        with pytest.raises(EasyAnimateError, match=words):
            decode(torch.zeros(shape))


def test_encode_refuses_wrong_pixel_shapes(vae):
    with pytest.raises(EasyAnimateError, match=r"encode pixels \(B, 3, F, H, W\).*C = 3 channels; got shape \(1, 4, 8, 16, 16\)"):
        vae.encode_latents(torch.zeros(1, 4, 8, 16, 16), sample=False)
    with pytest.raises(EasyAnimateError, match=r"got shape \(3, 8, 16, 16\)"):
        vae.encode(torch.zeros(3, 8, 16, 16))


# ------------------------------------------------------------------ 5. config files, headers
def test_read_json_config_names_the_file_and_the_problem(tmp_path):
    good = tmp_path / "config.json"
    good.write_text('{"a": 1}')
    assert read_json_config(good) == {"a": 1}
    broken = tmp_path / "broken.json"
    broken.write_text('{"a": 1,,}')
    with pytest.raises(LayoutError, match=r"broken.json' is not valid JSON: .* line 1, column 9"):
        read_json_config(broken)
    listing = tmp_path / "list.json"
    listing.write_text("[1, 2]")
    with pytest.raises(LayoutError, match="holds a JSON list, not an object"):
        read_json_config(listing)
    with pytest.raises(LayoutError, match="is a folder"):
        read_json_config(tmp_path)
    with pytest.raises(LayoutError, match="does not exist"):
        read_json_config(tmp_path / "missing.json")
    big = tmp_path / "big.json"
    big.write_text('{"a": "' + "x" * 2000 + '"}')
    with pytest.raises(LayoutError, match="a config is a small JSON file"):
        read_json_config(big, max_bytes=1000)
    binary = tmp_path / "binary.json"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(LayoutError, match="not a text file"):
        read_json_config(binary)


def test_read_json_config_does_not_read_a_device():
    if not Path("/dev/zero").exists():
        pytest.skip("no /dev/zero")
    started = time.time()
    with pytest.raises(LayoutError, match="not a regular file"):
        read_json_config("/dev/zero")
    assert time.time() - started < 1


def test_broken_transformer_config_names_the_file(tmp_path, v3_state):
    folder = write_folder(tmp_path, tiny_config_dict("v3"), v3_state)
    (folder / "config.json").write_text('{"num_layers": 16,')
    with pytest.raises(LayoutError, match=r"transformer config '.*config.json' is not valid JSON"):
        load_transformer(folder)


def test_safetensors_header_claiming_more_than_the_file_holds(tmp_path):
    path = tmp_path / "claims.safetensors"
    header = json.dumps({"w": {"dtype": "F32", "shape": [100000, 100000], "data_offsets": [0, 4096]}}).encode()
    path.write_bytes(struct.pack("<Q", len(header)) + header + bytes(4096))
    with pytest.raises(CorruptCheckpointError, match=r"inconsistent.*10,000,000,000 F32 values.*given 4,096 bytes"):
        safetensors_keys(path)
    ok = tmp_path / "ok.safetensors"
    save_file({"w": torch.ones(2, 3), "b": torch.zeros(4, dtype=torch.bfloat16)}, str(ok))
    assert safetensors_keys(ok) == {"w": ([2, 3], "F32"), "b": ([4], "BF16")}


# ------------------------------------------------------------------ 6. legacy torch files
def test_legacy_pre_zip_bin_of_plain_tensors_loads(tmp_path, v3_state):
    path = tmp_path / "diffusion_pytorch_model.bin"
    torch.save(v3_state, path, _use_new_zipfile_serialization=False)
    loaded = load_legacy(path)
    assert set(loaded) == set(v3_state)
    assert all(torch.equal(loaded[k], v3_state[k]) for k in v3_state)
    (tmp_path / "config.json").write_text(json.dumps(tiny_config_dict("v3")))
    model = load_transformer(tmp_path)
    assert torch.equal(model.proj_out.weight, v3_state["proj_out.weight"])


class _SystemCall:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")  # torch's note on the raw pickle's protocol
@pytest.mark.parametrize("form", ["zip", "legacy", "raw_pickle"])
def test_pickle_that_runs_a_command_is_refused_and_never_runs(tmp_path, form):
    marker = tmp_path / "payload-ran"
    state = {"weight": torch.ones(2), "evil": _SystemCall(marker)}
    path = tmp_path / "model.bin"
    if form == "raw_pickle":
        path.write_bytes(pickle.dumps(state))
    else:
        torch.save(state, path, _use_new_zipfile_serialization=form == "zip")
    with pytest.raises(CorruptCheckpointError, match="pickled Python objects or code.*refused for safety"):
        load_legacy(path)
    assert not marker.exists()


# ------------------------------------------------------------------------------------------ memory of a request
def _tiny_v3():
    from easyanimate.vae import build_vae

    model = random_model("v3", num_layers=2)
    torch.manual_seed(0)
    return model, build_vae("v3", dict(TINY_VAE))


def _text(model):
    from easyanimate.pipeline import Conditioning

    g = torch.Generator().manual_seed(0)
    return Conditioning(torch.randn(1, 6, model.config.caption_channels, generator=g), torch.ones(1, 6))


def test_a_request_larger_than_the_memory_limit_is_refused_before_any_model_runs(monkeypatch):
    """The estimate comes from each model's own `activation_bytes` and the pixels the run keeps; the limit is
    set low through the host's parameter, nothing large is allocated."""
    from easyanimate.host import StandaloneHost
    from easyanimate.pipeline import generate, stages_for

    model, vae = _tiny_v3()
    calls = []
    monkeypatch.setattr(vae, "encode_latents", lambda *a, **k: calls.append("vae"))
    model.register_forward_pre_hook(lambda *a: calls.append("transformer"))
    options = dict(frames=64, height=64, width=64, steps=2, guidance_scale=6.0)
    stages = stages_for(model, vae)
    estimate = stages.memory_estimate(stages.request(**options))
    need = estimate.compute_bytes + estimate.ram_bytes
    host = StandaloneHost(compute="cpu", memory_limit=need - 1)
    placement = host.placement(transformer=model, vae=vae.model)
    with pytest.raises(EasyAnimateError, match=r"64 frames at 64x64 needs about .* of memory \(.*conditioning pixels") as info:
        generate(model, vae, _text(model), _text(model), placement=placement, **options)
    assert "available" in str(info.value) and "fewer frames or a smaller size" in str(info.value)
    assert calls == []
    # the same request within the limit runs
    monkeypatch.undo()
    host = StandaloneHost(compute="cpu", memory_limit=need)
    generate(model, vae, _text(model), _text(model), placement=host.placement(transformer=model, vae=vae.model),
             **dict(options, frames=8))


def test_the_estimate_grows_with_frames_and_size_and_names_the_larger_stage():
    from easyanimate.pipeline import stages_for

    model, vae = _tiny_v3()
    stages = stages_for(model, vae)
    small = stages.memory_estimate(stages.request(frames=8, height=32, width=32))
    long = stages.memory_estimate(stages.request(frames=800, height=32, width=32))
    wide = stages.memory_estimate(stages.request(frames=8, height=320, width=320))
    assert long.ram_bytes == 100 * small.ram_bytes  # the pixels of the conditioning video: linear in frames
    assert wide.ram_bytes == 100 * small.ram_bytes
    # one VAE slice does not grow with the length of the video; the transformer's tokens do
    assert long.compute["latents and guidance batch" if "transformer activations" in long.compute else "latents"] \
        == 100 * small.compute["latents and guidance batch" if "transformer activations" in small.compute else "latents"]
    assert stages.memory_estimate(stages.request(frames=8, height=32, width=32, guidance_scale=1.0)).compute_bytes \
        < small.compute_bytes  # no guidance: half the model batch


def test_a_gpu_request_is_refused_only_when_its_unavoidable_part_cannot_fit():
    from easyanimate.host import MemoryEstimate, MemoryLimits, check_memory

    estimate = MemoryEstimate({"transformer activations": 10 * 2**30}, {"decoded video": 2**30}, 3 * 2**30, 2 * 2**30)
    check_memory(estimate, MemoryLimits(torch.device("cuda"), 8 * 2**30, 16 * 2**30))  # may still run: not refused
    with pytest.raises(EasyAnimateError, match="at least 3.00 GiB on cuda"):
        check_memory(estimate, MemoryLimits(torch.device("cuda"), 2 * 2**30, 16 * 2**30))
    with pytest.raises(EasyAnimateError, match="of RAM"):
        check_memory(estimate, MemoryLimits(torch.device("cuda"), 8 * 2**30, 2**29))
    with pytest.raises(EasyAnimateError, match="memory budget of 1.00 GiB"):
        check_memory(estimate, MemoryLimits(torch.device("cuda"), 8 * 2**30, 16 * 2**30), budget_bytes=2**30)
    with pytest.raises(EasyAnimateError, match="needs about 11.00 GiB of memory"):
        check_memory(estimate, MemoryLimits(torch.device("cpu"), 10 * 2**30, 10 * 2**30))
