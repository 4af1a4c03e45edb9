"""Every shipped API workflow in a real ComfyUI server on the CPU, with tiny models swapped in.

Runs when `COMFYUI_DIR` names a ComfyUI checkout (and `COMFYUI_PYTHON` an interpreter with its
requirements, default: the current one); skipped with the reason printed otherwise. The server gets a
fresh base directory with the pack linked into custom_nodes/, tiny models in the release layout under
models/easyanimate and models/loras, an input image and an input video (made by ComfyUI itself), then
each workflow is queued through `/prompt` and the saved video is opened and measured.

V1-V3 workflows run on a tiny V3 release (or the tiny PixArt base + motion module), V5.1 workflows on tiny V5.1
releases of the variant their model names (`EasyAnimateV5.1-12b-zh-InP` -> `EasyAnimateV5.1-tiny-InP`, Control,
Control-Camera), made by `release_v5.make_release_v51`, at V5's frame rule (1 + 4k frames).
"""
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from safetensors.torch import load_file

from comfyui_script import comfyui_command
from conftest import ROOT
from pack_fixtures import write_lora
from release import make_release, make_v1_release
from release_v5 import make_release_v5, make_release_v51
from test_pipeline import V51_DEMO_FOLDER, demo_clip

COMFYUI_DIR = os.environ.get("COMFYUI_DIR")
pytestmark = pytest.mark.skipif(not COMFYUI_DIR, reason="COMFYUI_DIR is not set: no real ComfyUI to run the workflows in")

SIZE, FRAMES, STEPS = 32, 8, 2
FRAMES_V51 = 9  # V5/V5.1 make 1 + 4k frames
CONTROL_FRAMES = 12  # the control video: at least as many frames as the video
# The V5.1 release variants the shipped workflows name (the end of the folder name) -> make_release_v51's variant.
V51_VARIANTS = {"Control-Camera": "camera", "Control": "control", "InP": "inp"}  # longest suffix first
V5_TINY = "EasyAnimateV5-tiny-InP"  # a V5 release: Bert + mT5 text encoders, DDPM-family scheduler


def v51_tiny(model: str) -> str:
    """The tiny release standing in for a V5.1 release folder name, e.g. EasyAnimateV5.1-12b-zh-Control ->
    EasyAnimateV5.1-tiny-Control."""
    suffix = next((s for s in V51_VARIANTS if model.endswith("-" + s)), None)
    assert suffix is not None, f"no tiny V5.1 release for {model!r}: add its variant to V51_VARIANTS"
    return f"EasyAnimateV5.1-tiny-{suffix}"


def is_v51(graph: dict) -> bool:
    return any(node["class_type"] == "LoadEasyAnimate" and node["inputs"]["model"].startswith("EasyAnimateV5.1")
               for node in graph.values())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def request(url, data=None):
    body = json.dumps(data).encode() if data is not None else None
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"} if body else {})
    with urllib.request.urlopen(req, timeout=30) as response:
        return json.loads(response.read() or b"null")


def run_prompt(url, graph, timeout=600) -> dict:
    prompt_id = request(f"{url}/prompt", {"prompt": graph})["prompt_id"]
    deadline = time.time() + timeout
    while time.time() < deadline:
        history = request(f"{url}/history/{prompt_id}")
        if prompt_id in history and history[prompt_id].get("status", {}).get("completed") is not None:
            entry = history[prompt_id]
            if entry["status"].get("status_str") != "success" or not entry.get("outputs"):
                messages = entry["status"].get("messages", [])
                raise AssertionError(f"prompt failed: {json.dumps(messages)[:2000]}")
            return entry
        time.sleep(0.5)
    raise AssertionError("prompt did not finish in time")


def saved_video(base, entry, what="") -> Path:
    """The first video a finished prompt saved."""
    saved = [item for output in entry["outputs"].values() for item in output.get("images", [])]
    assert saved, f"{what}: no output file"
    return base / "output" / saved[0]["subfolder"] / saved[0]["filename"]


def probe_video(python, video) -> tuple[int, int, int, float]:
    """(frames, height, width, pixel spread) of a video file, read with PyAV in ComfyUI's interpreter."""
    probe = subprocess.run([python, "-c", (
        "import av, sys, numpy as np\n"
        "c = av.open(sys.argv[1]); frames = [f.to_ndarray(format='rgb24') for f in c.decode(video=0)]\n"
        "print(len(frames), frames[0].shape[0], frames[0].shape[1], float(np.std(np.stack(frames))))"
    ), str(video)], capture_output=True, text=True, check=True)
    count, height, width, spread = probe.stdout.split()
    return int(count), int(height), int(width), float(spread)


def png_bytes(width, height):
    import struct
    import zlib

    rows = b"".join(b"\x00" + bytes(v for x in range(width) for v in ((x * 5) % 256, (y * 6) % 256, 128))
                    for y in range(height))

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    base = tmp_path_factory.mktemp("comfy")
    for sub in ("custom_nodes", "models/easyanimate", "models/loras", "input", "output"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    (base / "custom_nodes" / "easyanimate_pack").symlink_to(ROOT, target_is_directory=True)
    models = base / "models"
    release = make_release(models / "easyanimate" / "EasyAnimateV3-tiny", "v3")
    make_v1_release(models / "easyanimate" / "PixArt-tiny", models / "easyanimate" / "mm-tiny.safetensors")
    for suffix, variant in V51_VARIANTS.items():
        make_release_v51(models / "easyanimate" / f"EasyAnimateV5.1-tiny-{suffix}", variant)
    make_release_v5(models / "easyanimate" / V5_TINY, "inp")
    write_lora(models / "loras" / "style_a.safetensors",
               load_file(str(release / "transformer" / "diffusion_pytorch_model.safetensors")), seed=1)
    (base / "input" / "example.png").write_bytes(png_bytes(48, 40))
    (base / "input" / "example_end.png").write_bytes(png_bytes(40, 48))  # another picture: the end frame

    port = free_port()
    python = os.environ.get("COMFYUI_PYTHON", sys.executable)  # also reads the written videos (PyAV)
    command = comfyui_command(Path(COMFYUI_DIR) / "main.py", "--cpu", "--listen", "127.0.0.1", "--port", port,
                              "--base-directory", base, "--disable-auto-launch")
    log = open(base / "server.log", "w")
    process = subprocess.Popen(command, cwd=COMFYUI_DIR, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(240):
            try:
                request(f"{url}/object_info/LoadEasyAnimate")
                break
            except Exception:
                if process.poll() is not None:
                    raise AssertionError((base / "server.log").read_text()[-3000:])
                time.sleep(0.5)
        else:
            raise AssertionError("ComfyUI did not start: " + (base / "server.log").read_text()[-3000:])
        # An input video for video-to-video, made by ComfyUI's own nodes.
        entry = run_prompt(url, {
            "1": {"class_type": "EmptyImage", "inputs": {"width": 48, "height": 40, "batch_size": FRAMES, "color": 3355647}},
            "2": {"class_type": "CreateVideo", "inputs": {"images": ["1", 0], "fps": 8.0}},
            "3": {"class_type": "SaveVideo", "inputs": {"video": ["2", 0], "filename_prefix": "input_video",
                                                        "format": "mp4", "codec": "h264"}},
        })
        made = entry["outputs"]["3"]["images"][0]
        shutil.copy(base / "output" / made["subfolder"] / made["filename"], base / "input" / "input_video.mp4")
        # A control video (V5.1 Control), longer than the V5.1 videos.
        entry = run_prompt(url, {
            "1": {"class_type": "EmptyImage", "inputs": {"width": 48, "height": 40, "batch_size": CONTROL_FRAMES,
                                                         "color": 16777215}},
            "2": {"class_type": "CreateVideo", "inputs": {"images": ["1", 0], "fps": 8.0}},
            "3": {"class_type": "SaveVideo", "inputs": {"video": ["2", 0], "filename_prefix": "control_video",
                                                        "format": "mp4", "codec": "h264"}},
        })
        made = entry["outputs"]["3"]["images"][0]
        shutil.copy(base / "output" / made["subfolder"] / made["filename"], base / "input" / "control_video.mp4")
        yield url, base, python
    finally:
        process.terminate()
        process.wait(timeout=30)


def tiny(graph: dict) -> dict:
    """The workflow with the tiny models and small sizes swapped in (V5.1: a tiny release of the same variant,
    V5's frame rule)."""
    frames = FRAMES_V51 if is_v51(graph) else FRAMES
    for node in graph.values():
        inputs, kind = node["inputs"], node["class_type"]
        if kind == "LoadEasyAnimate":
            v1 = inputs.get("motion_module", "none") != "none"
            if inputs["model"].startswith("EasyAnimateV5.1"):
                inputs["model"] = v51_tiny(inputs["model"])
            else:
                inputs["model"] = "PixArt-tiny" if v1 else "EasyAnimateV3-tiny"
            inputs["precision"] = "fp32"
            if v1:
                inputs["motion_module"] = "mm-tiny.safetensors"
        elif kind in ("EasyAnimateLoRALoader", "LoraLoaderModelOnly"):
            inputs["lora_name"] = "style_a.safetensors"
        elif kind == "EasyAnimateSampler":
            inputs.update(width=SIZE, height=SIZE, frames=frames, steps=STEPS)
        elif kind == "EasyAnimateToVideo":  # the native route's
            inputs.update(width=SIZE, height=SIZE, frames=frames)
        elif kind == "KSampler":
            inputs["steps"] = STEPS
        elif kind == "MuLTIVideoTextScore":
            inputs["frames_per_video"] = FRAMES
    return graph


@pytest.mark.parametrize("path", sorted((ROOT / "workflows" / "api").glob("*.json")), ids=lambda p: p.name)
def test_shipped_workflow_runs_in_comfyui(server, path):
    url, base, python = server
    graph = json.loads(path.read_text())
    frames = FRAMES_V51 if is_v51(graph) else FRAMES  # what the tiny run must make
    count, height, width, spread = probe_video(python, saved_video(base, run_prompt(url, tiny(graph)), path.name))
    assert (count, height, width) == (frames, SIZE, SIZE), f"{path.name}: {count} frames of {height}x{width}"
    assert spread > 0  # not a blank video


def test_lora_through_comfyui_patches_equals_the_standalone_path(server, pack, monkeypatch):
    """The same LoRA applied by ComfyUI's ModelPatcher (key map from our resolver) and by our standalone
    patches gives the same latents."""
    url, base, _ = server
    graph = {
        "1": {"class_type": "LoadEasyAnimate", "inputs": {"model": "EasyAnimateV3-tiny", "precision": "fp32"}},
        "9": {"class_type": "EasyAnimateLoRALoader", "inputs": {"model": ["1", 0], "t5": ["1", 2], "lora_name": "style_a.safetensors",
                                                                "strength_model": 0.8, "strength_t5": 0.0}},
        "2": {"class_type": "EasyAnimateT5Encode", "inputs": {"t5": ["9", 1], "prompt": "a red circle", "negative_prompt": "blurry",
                                                              "clean_caption": True}},
        "3": {"class_type": "EasyAnimateSampler", "inputs": {"model": ["9", 0], "embeds": ["2", 0], "vae": ["1", 1], "width": SIZE,
                                                             "height": SIZE, "frames": FRAMES, "seed": 5, "steps": STEPS, "cfg": 6.0,
                                                             "sampler_name": "Euler", "denoise": 1.0}},
        "4": {"class_type": "SaveLatent", "inputs": {"samples": ["3", 0], "filename_prefix": "latents/lora"}},
    }
    entry = run_prompt(url, graph)
    item = entry["outputs"]["4"]["latents"][0]
    comfy_latents = load_file(str(base / "output" / item["subfolder"] / item["filename"]))["latent_tensor"]

    monkeypatch.setenv("EASYANIMATE_MODELS_DIR", str(base / "models"))
    nodes = pack.nodes.NODE_CLASS_MAPPINGS
    model, vae, t5 = nodes["LoadEasyAnimate"]().load("EasyAnimateV3-tiny", "fp32")
    model, t5 = nodes["EasyAnimateLoRALoader"]().apply(model, "style_a.safetensors", 0.8, 0.0, t5=t5)
    embeds = nodes["EasyAnimateT5Encode"]().encode("a red circle", "blurry", True, t5=t5)[0]
    ours = nodes["EasyAnimateSampler"]().sample(model, embeds, vae, SIZE, SIZE, FRAMES, 5, STEPS, 6.0, "Euler", 1.0)[0]["samples"]
    err = ((ours - comfy_latents).abs().max() / comfy_latents.abs().max()).item()
    print(f"LoRA latents, ComfyUI patches vs standalone: rel error {err:.2e}")
    assert err < 1e-4


# --- the V5.1 workflows on the shipped V5.1 demo model ----------------------------------------------------
V51_DEMO = V51_DEMO_FOLDER.name
# The V5.1 workflows an InP model runs (Control and Control-Camera need those releases: tiny ones above).
V51_DEMO_WORKFLOWS = ("easyanimate_v51_t2v.json", "easyanimate_v51_i2v_start_end.json", "easyanimate_v51_native_t2v.json")
DEMO_PROMPT = "a red circle moving right on a black background"
# Mean |first frame - start image| (and last frame - end image) allowed, in 0-1 units, after ComfyUI's h264
# encoding: the pipeline's image-to-video tolerance of the demo (tests/test_pipeline.py, 0.06) plus the end
# image's weaker pull (0.053 of the end image in the pipeline) and the codec's loss. Measured: 0.044 / 0.052.
V51_DEMO_ENDS_TOLERANCE = 0.07


def on_v51_demo(graph: dict) -> dict:
    """The workflow as shipped with the demo in place of the release: its folder, a prompt in its vocabulary,
    the size, frames, steps, CFG and flow shift of its generation.json and scheduler; every other input stays."""
    settings = json.loads((V51_DEMO_FOLDER / "generation.json").read_text())
    shift = json.loads((V51_DEMO_FOLDER / "scheduler" / "scheduler_config.json").read_text())["shift"]
    size = dict(width=settings["width"], height=settings["height"], frames=settings["frames"])
    run = dict(steps=settings["steps"], cfg=settings["guidance_scale"])
    for node in graph.values():
        inputs, kind = node["inputs"], node["class_type"]
        if kind == "LoadEasyAnimate":
            inputs["model"] = V51_DEMO
        elif kind in ("EasyAnimateV5TextEncode", "EasyAnimateV5TextEncodeConditioning"):
            inputs.update(prompt=DEMO_PROMPT, negative_prompt=settings["negative_prompt"])
        elif kind == "EasyAnimateSampler":
            inputs.update(**size, **run)
        elif kind == "EasyAnimateToVideo":
            inputs.update(**size)
        elif kind == "KSampler":
            inputs.update(**run)
        elif kind == "ModelSamplingSD3":
            inputs["shift"] = shift  # the workflow's 1.0 is the release's shift; the demo's is its scheduler's
        elif kind == "LoadImage":
            inputs["image"] = {"example.png": "demo_start.png", "example_end.png": "demo_end.png"}[inputs["image"]]
    return graph


@pytest.mark.skipif(not (V51_DEMO_FOLDER / "transformer" / "config.json").is_file(), reason="V5.1 demo not shipped")
@pytest.mark.parametrize("name", V51_DEMO_WORKFLOWS)
def test_v51_workflow_runs_on_the_demo_model(server, name):
    """The V5.1 InP workflows on the demo (listed by Load EasyAnimate like any release): the video has the
    demo's size and frame count and shows what the prompt asks (colour and direction); with a start and end
    image its first and last frames are those images."""
    import numpy as np
    from PIL import Image

    from easyanimate.evaluate import analyze_video

    url, base, python = server
    frames = json.loads((V51_DEMO_FOLDER / "generation.json").read_text())["frames"]
    # DEMO_PROMPT's clip, (frames, 64, 64, 3) uint8
    clip = (demo_clip(5, "red", "circle", "right", "black")[0].permute(1, 2, 3, 0) * 255).round().byte().numpy()
    Image.fromarray(clip[0]).save(base / "input" / "demo_start.png")
    Image.fromarray(clip[-1]).save(base / "input" / "demo_end.png")
    graph = on_v51_demo(json.loads((ROOT / "workflows" / "api" / name).read_text()))
    video_file = saved_video(base, run_prompt(url, graph), name)
    dump = base / f"{name}.npy"
    subprocess.run([python, "-c", (
        "import av, sys, numpy as np\n"
        "c = av.open(sys.argv[1]); np.save(sys.argv[2], np.stack([f.to_ndarray(format='rgb24') for f in c.decode(video=0)]))"
    ), str(video_file), str(dump)], check=True)
    video = np.load(dump)
    assert video.shape == (frames, 64, 64, 3), video.shape
    analysis = analyze_video(video)
    print(f"{name} on {V51_DEMO}: colour {analysis.colour}, shape {analysis.shape}, direction {analysis.direction}")
    assert (analysis.colour, analysis.direction) == ("red", "right"), analysis
    if "start_end" in name:
        first, last = (np.abs(video[i].astype(float) - clip[i]).mean() / 255 for i in (0, -1))
        print(f"first frame vs start image {first:.4f}, last frame vs end image {last:.4f} (mean abs, 0-1)")
        assert first <= V51_DEMO_ENDS_TOLERANCE and last <= V51_DEMO_ENDS_TOLERANCE


def on_v5(graph: dict) -> dict:
    """A V5.1 InP workflow turned to a V5 InP release, as a user would: the tiny V5 folder, the sampler's
    "auto" (V5's own DDPM-family sampler; Flow is V5.1's), and on the native route no ModelSamplingSD3 (V5
    samples discrete, as V1-V3)."""
    graph = tiny(graph)
    for key, node in list(graph.items()):
        inputs, kind = node["inputs"], node["class_type"]
        if kind == "LoadEasyAnimate":
            inputs["model"] = V5_TINY
        elif kind == "EasyAnimateSampler":
            inputs["sampler_name"] = "auto"
        elif kind == "ModelSamplingSD3":
            del graph[key]
            for other in graph.values():
                for name, value in other["inputs"].items():
                    if value == [key, 0]:
                        other["inputs"][name] = inputs["model"]
    return graph


@pytest.mark.parametrize("name", V51_DEMO_WORKFLOWS)
def test_a_v5_release_runs_the_v51_inp_workflows(server, name):
    """V5 (Bert + mT5 text encoders) in a real ComfyUI: Load EasyAnimate lists the folder, Text Encode V5/V5.1
    encodes with both encoders, and the sampler node and the native KSampler route make the video."""
    url, base, python = server
    entry = run_prompt(url, on_v5(json.loads((ROOT / "workflows" / "api" / name).read_text())))
    count, height, width, spread = probe_video(python, saved_video(base, entry, name))
    assert (count, height, width) == (FRAMES_V51, SIZE, SIZE) and spread > 0
