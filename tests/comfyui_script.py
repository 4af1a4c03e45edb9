"""Running a test script in a real ComfyUI's interpreter (tests gated on `COMFYUI_DIR`).

`COMFYUI_DIR` names a ComfyUI checkout and `COMFYUI_PYTHON` an interpreter with its requirements (default:
the current one). Scripts get the ComfyUI folder as their first argument and run from it; the test host's
launcher beside the project (`../shared/comfyhost/launch_comfy.py`), when present, lets ComfyUI import
beside a CPU-only torch without torchvision.
"""
import os
import subprocess
import sys
from pathlib import Path

from conftest import ROOT

COMFYUI_DIR = os.environ.get("COMFYUI_DIR")
LAUNCHER = ROOT.parent / "shared" / "comfyhost" / "launch_comfy.py"


def run_comfyui_script(folder: Path, name: str, source: str, *args, timeout: int = 600) -> str:
    """Write `source` to `folder/name`, run it as `script COMFYUI_DIR *args` in ComfyUI's interpreter, and
    return its output; fail the test unless it exits 0 and its output ends with "ok"."""
    script = Path(folder) / name
    script.write_text(source)
    python = os.environ.get("COMFYUI_PYTHON", sys.executable)
    command = [python] + ([str(LAUNCHER)] if LAUNCHER.is_file() else []) + [str(script), COMFYUI_DIR, *map(str, args)]
    result = subprocess.run(command, capture_output=True, text=True, cwd=COMFYUI_DIR, timeout=timeout,
                            env=dict(os.environ, COMFYHOST_TV_SHIM="1"))
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stdout[-2000:] + result.stderr[-3000:]
    return result.stdout
