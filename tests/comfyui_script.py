"""Running a test script in a real ComfyUI's interpreter (tests gated on `COMFYUI_DIR`).

`COMFYUI_DIR` names a ComfyUI checkout and `COMFYUI_PYTHON` an interpreter with its requirements (default:
the current one). Scripts get the ComfyUI folder as their first argument and run from it. `COMFYUI_LAUNCHER`,
when set, names a Python script that runs the given script inside whatever set-up the machine's ComfyUI needs
(`python LAUNCHER script args`; e.g. one that lets ComfyUI import beside a CPU-only torch without torchvision).
"""
import os
import subprocess
import sys
from pathlib import Path

COMFYUI_DIR = os.environ.get("COMFYUI_DIR")
LAUNCHER = os.environ.get("COMFYUI_LAUNCHER")


def comfyui_command(*args) -> list[str]:
    """The command that runs `args` (a script and its arguments) with ComfyUI's interpreter and launcher."""
    python = os.environ.get("COMFYUI_PYTHON", sys.executable)
    return [python, *([LAUNCHER] if LAUNCHER else []), *map(str, args)]


def run_comfyui_script(folder: Path, name: str, source: str, *args, timeout: int = 600) -> str:
    """Write `source` to `folder/name`, run it as `script COMFYUI_DIR *args` in ComfyUI's interpreter, and
    return its output; fail the test unless it exits 0 and its output ends with "ok"."""
    script = Path(folder) / name
    script.write_text(source)
    result = subprocess.run(comfyui_command(script, COMFYUI_DIR, *args), capture_output=True, text=True,
                            cwd=COMFYUI_DIR, timeout=timeout)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stdout[-2000:] + result.stderr[-3000:]
    return result.stdout
