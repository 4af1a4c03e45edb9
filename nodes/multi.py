"""MuLTI nodes: judge clips with a video-language model (score against prompts, answer questions, tag).

A ComfyUI IMAGE batch is a run of frames. When it holds several videos back to back (an EasyAnimate
Sampler with `batch_size` > 1, decoded), `frames_per_video` splits it; 0 means the whole batch is one
video. Every node samples the frames the model was trained with (segment middles), so any length works.
"""
from __future__ import annotations

import json
import logging
import weakref
from pathlib import Path

import torch

from . import host

log = logging.getLogger(__name__)

MULTI = "MULTI_MODEL"
CATEGORY = "EasyAnimate/MuLTI"
MODEL_FOLDER = "multi"  # models/multi: MuLTI model folders (config.json + model.safetensors + tokenizer)
PRECISIONS = ["auto", "fp32", "fp16", "bf16"]

_LOADED: "weakref.WeakValueDictionary[tuple, MuLTIHandle]" = weakref.WeakValueDictionary()


class MuLTIHandle:
    """MULTI_MODEL: a loaded MuLTI bundle (model, tokenizer, config) and its host component."""

    def __init__(self, name: str, bundle, component: host.Component):
        self.name, self.bundle, self.component = name, bundle, component

    def __repr__(self):
        return f"MuLTIHandle({self.name!r})"


# ------------------------------------------------------------------------------------------ model files
def demo_models() -> dict[str, Path]:
    """The small MuLTI model(s) shipped inside the pack."""
    return host.demo_folders("multi/demo", "config.json")


def list_models() -> list[str]:
    """Shipped models first, then folders with a config.json under models/multi."""
    return host.list_model_folders(MODEL_FOLDER, demo_models(), ("config.json",))


def resolve_model(name: str) -> Path:
    return host.resolve_model_folder(MODEL_FOLDER, name, demo_models())


# ------------------------------------------------------------------------------------------ frames
def split_videos(images: torch.Tensor, frames_per_video: int) -> list[torch.Tensor]:
    """IMAGE (N, H, W, C) -> a list of (T, H, W, 3) videos of `frames_per_video` frames (0: one video)."""
    if images.ndim != 4:
        raise ValueError(f"Expected an IMAGE batch (frames, height, width, channels); got shape {tuple(images.shape)}.")
    count = images.shape[0]
    if frames_per_video <= 0 or frames_per_video == count:
        return [images[..., :3]]
    if count % frames_per_video:
        raise ValueError(
            f"The batch has {count} frames, which is not a whole number of {frames_per_video}-frame videos. "
            f"Set frames_per_video to the frames of one video (e.g. the Sampler's frames) or 0 for a single video."
        )
    return list(images[..., :3].split(frames_per_video))


def _texts(text: str) -> list[str]:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        raise ValueError("Give at least one text (one per line).")
    return lines


FRAMES_INPUTS = {
    "frames_per_video": ("INT", {"default": 0, "min": 0, "max": 4096, "tooltip": "Frames of one video when the batch "
                                 "holds several videos back to back (e.g. the Sampler's frames with batch_size > 1). "
                                 "0: the whole batch is one video."}),
}


# ------------------------------------------------------------------------------------------ nodes
class MuLTILoader:
    DESCRIPTION = (
        "Loads a MuLTI video-language model (video ViT + BERT fused by a text-guided MultiWay-Sampler) from "
        "models/multi, or the small model shipped with the pack (trained on synthetic moving shapes)."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = (MULTI,)
    RETURN_NAMES = ("multi_model",)
    OUTPUT_TOOLTIPS = ("The MuLTI model, for the score, question and tag nodes.",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": (list_models() or ["(put MuLTI folders in models/multi)"],
                          {"tooltip": "A MuLTI folder (config.json, model.safetensors, tokenizer files) in "
                                      "models/multi, or the shipped demo model (listed first)."}),
                "precision": (PRECISIONS, {"default": "auto", "tooltip": "Weight dtype. auto: bf16/fp16 on GPUs, "
                                                                      "fp32 on the CPU."}),
            },
        }

    @classmethod
    def IS_CHANGED(cls, model, precision):
        try:
            folder = resolve_model(model)
            return str(hash(tuple((p.name, p.stat().st_mtime_ns, p.stat().st_size) for p in sorted(folder.iterdir()))))
        except Exception:
            return float("nan")

    def load(self, model, precision):
        from ..easyanimate.checkpoint import parse_dtype
        from ..easyanimate.multi.io import load_multi

        runtime = host.current_host()
        folder = resolve_model(model)
        dtype = parse_dtype(runtime.precision(precision))
        key = (str(folder), str(dtype))
        cached = _LOADED.get(key)
        if cached is not None:
            return (cached,)
        bundle = load_multi(folder, device="cpu", dtype=dtype)
        bundle.model.eval()
        handle = MuLTIHandle(model, bundle, runtime.wrap(bundle.model, "multi"))
        _LOADED[key] = handle
        return (handle,)


class MuLTIVideoTextScore:
    DESCRIPTION = (
        "Scores how well each video shows each text (MuLTI's contrastive similarity, and with `match` on, its "
        "video-text matching probability), ranks the videos, and outputs the best one. Generate several "
        "candidates (Sampler batch_size), decode, and keep the video that follows the prompt best."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = ("IMAGE", "INT", "FLOAT", "STRING")
    RETURN_NAMES = ("best_video", "best_index", "best_score", "scores")
    OUTPUT_TOOLTIPS = (
        "The frames of the best-scoring video.",
        "Its index among the videos (0-based).",
        "Its score (mean over the texts).",
        "Every score as a table (JSON), one row per video.",
    )
    FUNCTION = "score"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "multi_model": (MULTI, {"tooltip": "From MuLTI Loader."}),
                "frames": ("IMAGE", {"tooltip": "One video, or several back to back (see frames_per_video)."}),
                "texts": ("STRING", {"multiline": True, "default": "a red circle moving right on a black background",
                                     "tooltip": "One or more texts, one per line (e.g. the generation prompt)."}),
                **FRAMES_INPUTS,
                "match": ("BOOLEAN", {"default": True, "tooltip": "Score with the video-text matching head (fused, "
                                      "text-guided; slower, finer) instead of the contrastive cosine alone."}),
            },
        }

    def score(self, multi_model, frames, texts, frames_per_video, match):
        from ..easyanimate.multi.evaluate import score_texts

        videos, lines = split_videos(frames, frames_per_video), _texts(texts)
        runtime = host.current_host()
        progress = runtime.progress(len(videos))
        rows = []
        with runtime.placed([multi_model.component]):
            for index, video in enumerate(videos):
                result = score_texts(multi_model.bundle, video, lines)  # vtc: cosine, vtm: match probability
                per_text = result["vtm"] if match else result["vtc"]
                rows.append({"video": index, "score": float(per_text.mean()),
                             "similarity": [round(float(s), 4) for s in result["vtc"]],
                             "match": [round(float(s), 4) for s in result["vtm"]]})
                progress.update(index + 1)
        best = max(rows, key=lambda r: r["score"])
        log.info("MuLTI: best video %d of %d (score %.3f)", best["video"], len(rows), best["score"])
        table = json.dumps({"texts": lines, "scored_by": "match" if match else "similarity", "videos": rows}, indent=1)
        return videos[best["video"]].contiguous(), best["video"], best["score"], table


class MuLTIVideoQA:
    DESCRIPTION = (
        "Answers a question about a video. With options (one per line) it picks one, MuLTI's multiple-choice "
        "head scoring each; without options it answers from the model's answer vocabulary."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = ("STRING", "INT", "STRING")
    RETURN_NAMES = ("answer", "answer_index", "probabilities")
    OUTPUT_TOOLTIPS = (
        "The chosen option or the open-ended answer.",
        "Index of the chosen option (-1 for open-ended answers).",
        "Probabilities of the options (or of the top answers), JSON.",
    )
    FUNCTION = "answer"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "multi_model": (MULTI, {"tooltip": "From MuLTI Loader."}),
                "frames": ("IMAGE", {"tooltip": "The video (a batch of frames). Several videos: the first is asked."}),
                "question": ("STRING", {"multiline": False, "default": "what colour is the shape?",
                                        "tooltip": "The question about the video."}),
                "options": ("STRING", {"multiline": True, "default": "red\ngreen\nblue\nyellow",
                                       "tooltip": "Answer options, one per line. Leave empty for an open-ended answer."}),
                **FRAMES_INPUTS,
            },
        }

    def answer(self, multi_model, frames, question, options, frames_per_video):
        from ..easyanimate.multi.evaluate import answer_choice, answer_open

        video = split_videos(frames, frames_per_video)[0]
        if not question.strip():
            raise ValueError("The question is empty. Type a question about the video.")
        choices = [line.strip() for line in options.splitlines() if line.strip()]
        with host.current_host().placed([multi_model.component]):
            if choices:
                result = answer_choice(multi_model.bundle, video, question, choices)
                probs = {c: round(float(p), 4) for c, p in zip(choices, result["probs"])}
                return result["answer"], int(result["index"]), json.dumps(probs)
            result = answer_open(multi_model.bundle, video, question)
        return result["answer"], -1, json.dumps({a: round(float(p), 4) for a, p in result["probs"].items()})


class MuLTITags:
    DESCRIPTION = "Tags a video with MuLTI's multi-label head: every tag whose probability reaches the threshold."
    CATEGORY = CATEGORY
    RETURN_TYPES = ("STRING", "STRING")
    RETURN_NAMES = ("tags", "scores")
    OUTPUT_TOOLTIPS = ("Tags above the threshold, comma-separated, most likely first.",
                       "Every tag's probability, JSON.")
    FUNCTION = "tag"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "multi_model": (MULTI, {"tooltip": "From MuLTI Loader."}),
                "frames": ("IMAGE", {"tooltip": "The video (a batch of frames). Several videos: the first is tagged."}),
                "threshold": ("FLOAT", {"default": 0.5, "min": 0.0, "max": 1.0, "step": 0.05,
                                        "tooltip": "Minimum probability for a tag to be listed."}),
                **FRAMES_INPUTS,
            },
        }

    def tag(self, multi_model, frames, threshold, frames_per_video):
        from ..easyanimate.multi.evaluate import predict_tags

        video = split_videos(frames, frames_per_video)[0]
        with host.current_host().placed([multi_model.component]):
            scores = predict_tags(multi_model.bundle, video)["probs"]
        ranked = sorted(scores.items(), key=lambda kv: -kv[1])
        tags = [name for name, p in ranked if p >= threshold]
        return ", ".join(tags), json.dumps({name: round(float(p), 4) for name, p in ranked})
