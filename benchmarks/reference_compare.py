"""Side-by-side runs of this pack and the original EasyAnimate code, for benchmarks/dit_forward.py and
benchmarks/vae_memory.py (`--reference-python PATH --reference-src DIR`), and of this pack and diffusers'
EasyAnimate classes (V5/V5.1), for benchmarks/mmdit_forward.py and benchmarks/vae5_decode.py
(`--diffusers-python PATH`: an environment with diffusers >= 0.33, where `reference_child.py` runs
`EasyAnimateTransformer3DModel` / `AutoencoderKLMagvit`; no checkout needed).

A ratio against another implementation is only printed from runs of both taken in the same invocation:
every run is a fresh process, ours with this interpreter and the reference's with `--reference-python` (an
environment where the original code imports: its checkout is `--reference-src`; `reference_child.py`,
beside this file, is the small script that runs there), alternating ours / theirs for `--rounds` rounds on
the same weights and inputs, which the benchmark writes once to a temporary folder in the release layout.

Load: before each run the machine's 1-minute load average is read (it still holds the benchmark's own
previous run, so it is printed, not judged); during the timed part of the run the child reads from
/proc/stat the CPU time of every process, and whatever it did not take itself is other load. A run with
more than `--max-other-load` cores of other load on average is taken again, at most `--retries` times, and
marked `*` if it never ran alone.
Peak memory is the child's own peak resident set (`ru_maxrss` from `wait4`, the whole process) and the
figures the child reads from /proc/self/status.

Setting up such an environment: a checkout (or `git archive`) of aigc-apps/EasyAnimate at commit b54412c
as ea_src, then a virtual environment whose torch is installed first, as a CPU build (the same version as
ours), so that nothing later replaces it with another build:

    python -m venv ea_env && ea_env/bin/pip install torch==2.13.0      # a CPU wheel
    ea_env/bin/pip install diffusers==0.28.2 transformers==4.42.4 "huggingface_hub<0.26" "setuptools<70" \\
        einops safetensors omegaconf numpy                              # keeping that torch
    python benchmarks/dit_forward.py --reference-python ea_env/bin/python --reference-src ea_src

(diffusers 0.28.2 imports `cached_download`, gone from huggingface_hub 0.26; the original code imports
`pkg_resources`, gone from recent setuptools.)
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from process_memory import busy_seconds

HERE = Path(__file__).resolve().parent
REFERENCE_COMMIT = "b54412ceb0af6a06bf907e049920f18508c862f1"
NO_REFERENCE = ("no comparison with the original EasyAnimate code in this run, so no ratio: give "
                "--reference-python PATH --reference-src DIR to run both side by side")


def add_options(parser) -> None:
    group = parser.add_argument_group("side by side with the original EasyAnimate code")
    group.add_argument("--reference-python", type=Path, default=None, metavar="PATH",
                       help="interpreter of an environment in which the original EasyAnimate V3 code imports "
                            "(torch CPU, diffusers 0.28.2, transformers 4.42.4)")
    group.add_argument("--reference-src", type=Path, default=None, metavar="DIR",
                       help=f"checkout of aigc-apps/EasyAnimate at V3 commit {REFERENCE_COMMIT[:7]}")
    _alternation_options(group)


def _alternation_options(group, rounds: int = 3, retries: int = 2) -> None:
    group.add_argument("--rounds", type=int, default=rounds,
                       help=f"alternating rounds ours / theirs (default {rounds})")
    group.add_argument("--max-other-load", type=float, default=0.2, metavar="CORES",
                       help="take a run again when other processes used more than this many cores on average "
                            "during it (default 0.2)")
    group.add_argument("--retries", type=int, default=retries,
                       help=f"how often a loaded run is taken again (default {retries})")


NO_DIFFUSERS = ("no comparison with diffusers in this run, so no ratio: give --diffusers-python PATH to run both "
                "side by side")


def add_diffusers_options(parser, rounds: int = 3, retries: int = 2) -> None:
    """--diffusers-python PATH and the alternation options, for the V5/V5.1 benchmarks."""
    group = parser.add_argument_group("side by side with diffusers")
    group.add_argument("--diffusers-python", type=Path, default=None, metavar="PATH",
                       help="interpreter of an environment with diffusers >= 0.33 (EasyAnimateTransformer3DModel, "
                            "AutoencoderKLMagvit) and torch; it runs benchmarks/reference_child.py")
    _alternation_options(group, rounds, retries)


def check_diffusers_options(parser, args) -> bool:
    """True when a comparison with diffusers was asked for; refuses an interpreter without diffusers' classes."""
    if args.diffusers_python is None:
        return False
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    probe = "import diffusers; from diffusers import EasyAnimateTransformer3DModel, AutoencoderKLMagvit; print(diffusers.__version__)"
    try:
        done = subprocess.run([str(args.diffusers_python), "-c", probe], capture_output=True, text=True, timeout=300)
    except OSError as err:
        parser.error(f"--diffusers-python {args.diffusers_python}: cannot run it ({err})")
    if done.returncode != 0:
        parser.error(f"--diffusers-python {args.diffusers_python}: diffusers' EasyAnimate classes do not import there "
                     f"(diffusers >= 0.33 needed):\n{done.stderr[-1500:]}")
    args.diffusers_version = done.stdout.strip().splitlines()[-1]
    return True


def diffusers_command(args, *child_args) -> list[str]:
    return [str(args.diffusers_python), str(HERE / "reference_child.py"), *map(str, child_args)]


def check_options(parser, args) -> bool:
    """True when a comparison was asked for (and its options make sense)."""
    if args.reference_python is None and args.reference_src is None:
        return False
    if args.reference_python is None or args.reference_src is None:
        parser.error("--reference-python and --reference-src go together")
    if not (args.reference_src / "easyanimate" / "models" / "transformer3d.py").is_file():
        parser.error(f"{args.reference_src} is not a checkout of the original EasyAnimate code "
                     "(no easyanimate/models/transformer3d.py)")
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    return True


def reference_command(args, *child_args) -> list[str]:
    return [str(args.reference_python), str(HERE / "reference_child.py"), "--src", str(args.reference_src),
            *map(str, child_args)]


def size_argument(multiple: int, example: str):
    """An argparse type for --size HEIGHTxWIDTH in pixels, both multiples of `multiple` (`example`: e.g. 480x720)."""
    import argparse

    def parse(text: str) -> tuple[int, int]:
        try:
            h, w = (int(v) for v in text.lower().split("x"))
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"--size takes HEIGHTxWIDTH in pixels, e.g. {example}; got {text!r}") from None
        if h % multiple or w % multiple:
            raise argparse.ArgumentTypeError(f"--size {text}: height and width must be multiples of {multiple}")
        return h, w

    return parse


def load_average() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


def run_child(cmd: list[str], env: dict | None = None) -> dict:
    """Run one child to its end; returns its last stdout line (JSON) as `result`, with the wall time, its
    CPU time, its peak RSS (ru_maxrss, bytes), the load average before it and the other processes' load."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        load = load_average()
        busy, start = busy_seconds(), time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        wall, busy = time.perf_counter() - start, busy_seconds() - busy
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0), err.seek(0)
        stdout, stderr = out.read().decode(), err.read().decode()
    if proc.returncode != 0:
        raise SystemExit(f"benchmark child failed ({' '.join(cmd)}):\n{stderr[-4000:]}")
    cpu = usage.ru_utime + usage.ru_stime
    result = json.loads(stdout.strip().splitlines()[-1])
    whole = max(0.0, busy - cpu) / max(wall, 1e-9)
    # judged on the timed part when the child measured it (imports and loading do not count)
    return {"result": result, "wall_s": wall, "cpu_s": cpu, "maxrss_bytes": usage.ru_maxrss * 1024,
            "load_before": load, "other_load_whole_run": whole, "other_load": result.get("other_load", whole)}


def alternate(args, commands: dict[str, tuple[list[str], dict | None]], label: str = "",
              summary=None) -> dict[str, list[dict]]:
    """`args.rounds` rounds of one fresh run per command, in the given order; a run under more than
    `args.max_other_load` cores of other load is taken again (at most `args.retries` times). Each run is
    reported on stderr as it ends, with `summary(result)` when given."""
    runs: dict[str, list[dict]] = {name: [] for name in commands}
    for round_ in range(1, args.rounds + 1):
        for name, (cmd, env) in commands.items():
            for attempt in range(args.retries + 1):
                run = run_child(cmd, env)
                run["round"], run["attempts"] = round_, attempt + 1
                run["loaded"] = run["other_load"] > args.max_other_load
                print(f"{label}round {round_} {name}: {run['wall_s']:.1f} s wall, load avg before "
                      f"{run['load_before']:.2f}, other load {run['other_load']:.2f} cores"
                      + (f"; {summary(run['result'])}" if summary else "")
                      + (" (taken again)" if run["loaded"] and attempt < args.retries else ""),
                      file=sys.stderr, flush=True)
                if not run["loaded"]:
                    break
            runs[name].append(run)
    return runs


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def load_note(args) -> str:
    return (f"load avg: the machine's 1-minute load average just before the run (it includes the previous "
            f"run of this benchmark); other load: cores used by other processes during the timed part; runs above "
            f"{args.max_other_load:g} were taken again (up to {args.retries} times), * = never ran alone.")
