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


# The start of a route-agreement script (`script COMFYUI_DIR ROOT WORK TOLERANCE VIDEO_TOLERANCE ...`): ComfyUI on
# the CPU with one torch thread, WORK/models/easyanimate registered as the easyanimate model folder, the pack
# imported as ComfyUI imports a custom node (`pack`, its node classes `N`). Scripts append their own lines.
ROUTE_SCRIPT_START = r"""
import importlib.util, json, sys
from pathlib import Path
comfy_dir, root, work = sys.argv[1], sys.argv[2], Path(sys.argv[3])
tolerance, video_tolerance = float(sys.argv[4]), float(sys.argv[5])
sys.path.insert(0, comfy_dir)
import comfy.cli_args
comfy.cli_args.args.cpu = True
import torch
torch.set_num_threads(1)
import comfy.model_management as mm
import comfy.model_sampling, comfy.samplers
import folder_paths
import nodes as comfy_nodes

folder_paths.add_model_folder_path("easyanimate", str(work / "models" / "easyanimate"))
spec = importlib.util.spec_from_file_location("easyanimate_pack", root + "/__init__.py", submodule_search_locations=[root])
pack = importlib.util.module_from_spec(spec); sys.modules["easyanimate_pack"] = pack; spec.loader.exec_module(pack)
N = pack.nodes.NODE_CLASS_MAPPINGS
from easyanimate_pack.easyanimate.sampling import build_sampler
"""


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
