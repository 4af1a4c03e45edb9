"""`python -m easyanimate multi-train / multi-eval`: help, and a tiny end-to-end run."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from easyanimate import cli

ROOT = Path(__file__).resolve().parent.parent.parent


@pytest.mark.parametrize("command", ["multi-train", "multi-eval"])
def test_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main([command, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "usage:" in out and command in out
    if command == "multi-train":
        for task in ("pretrain", "retrieval", "qa", "tags", "all"):
            assert task in out


def test_top_level_help_lists_the_multi_commands():
    result = subprocess.run([sys.executable, "-m", "easyanimate", "--help"], capture_output=True, text=True,
                            timeout=60, cwd=ROOT)
    assert result.returncode == 0 and "multi-train" in result.stdout and "multi-eval" in result.stdout
    # the hook is lazy: parsing the command line imports no model code
    probe = ("import sys; from easyanimate import cli; cli.build_parser(); "
             "print(any(m in sys.modules for m in ('transformers', 'easyanimate.multi.model', 'easyanimate.multi.train')))")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert result.stdout.strip() == "False", result.stderr


def test_tiny_multi_train_end_to_end(tmp_path, capsys):
    from .test_train import TINY

    config = tmp_path / "tiny.json"
    config.write_text(json.dumps(TINY))
    out = tmp_path / "run"
    args = ["multi-train", "all", "--out", str(out), "--config", str(config), "--steps", "2", "--finetune-steps", "2",
            "--batch", "4", "--clips", "8", "--warmup", "1", "--eval-clips", "0", "--quiet"]
    assert cli.main(args) == 0
    assert (out / "model" / "model.safetensors").is_file() and (out / "model" / "tokenizer.json").is_file()
    rows = [json.loads(line) for line in (out / "loss.jsonl").read_text().splitlines()]
    assert [r["stage"] for r in rows] == ["pretrain", "pretrain", "finetune", "finetune"]
    # a finetuning task from the written model, then the benchmark command on a few clips
    assert cli.main(["multi-train", "tags", "--init", str(out / "model"), "--out", str(tmp_path / "tags"),
                     "--steps", "1", "--batch", "4", "--data", str(out / "data"), "--clips", "8",
                     "--eval-clips", "0", "--quiet"]) == 0
    assert cli.main(["multi-eval", "--model", str(tmp_path / "tags" / "model"), "--clips", "8", "--rerank-k", "2",
                     "--json", str(tmp_path / "m.json")]) == 0
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert metrics["n"] == 8 and 0 <= metrics["mc"]["overall"] <= 100 and 0 <= metrics["tags"]["mAP"] <= 1
    assert "R@1" in capsys.readouterr().out


def test_shipped_demo_model_loads_and_is_small():
    from easyanimate.multi.cli import demo_model_path
    from easyanimate.multi.io import load_multi

    folder = demo_model_path()
    if not (folder / "model.safetensors").is_file():
        pytest.skip(f"shipped MuLTI model not found at {folder}")
    assert sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) < 30 * 2**20
    bundle = load_multi(folder)
    from easyanimate.multi import data as D

    assert bundle.config.tags == list(D.TAGS) and bundle.config.answers == list(D.ANSWERS)
    assert bundle.tokenizer("a red star moving left slowly on a brown background")["input_ids"].count(
        bundle.tokenizer.unk_token_id) == 0
    assert json.loads((folder / "training.json").read_text())["train_config"]["task"] == "all"
