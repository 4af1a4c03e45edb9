"""Camera control for the EasyAnimate V5.1 Control-Camera models: camera poses -> Plücker rays per pixel.

A Control-Camera model sees the camera path as 6 channels per pixel and frame: the Plücker coordinates
(o × d, d) of the ray through the pixel's centre, o the camera centre and d the unit viewing direction, both
in the coordinates of the first camera. `MMDiTStages` resizes these pixel-resolution rays to the latent grid
(frame 0 on its own, trilinear) and multiplies them by 6 (`generate(..., control_camera=rays)`).

Poses are written as in CameraCtrl / RealEstate10K files: a first line (there, the source video's address)
that is skipped, then one line per frame of 19 numbers

    timestamp  fx fy cx cy  0 0  the 3x4 world-to-camera matrix, row by row

with the intrinsics normalised by the source video's width (fx, cx) and height (fy, cy). The sources were
1280x720: for a video of another aspect ratio the focal length along the cropped axis is rescaled so the
field of view of the other axis is kept. Rows can also be given directly (ComfyUI's camera nodes build
the same 19 numbers per frame).

    rays = plucker_rays("orbit.txt", 384, 672, frames=49)                  # (1, 6, 49, 384, 672) float32
    rays = plucker_rays(rows, 384, 672, frames=49, stride=pose_stride(8))  # every 3rd row, as the predict script

The pose algebra runs in float64 and the rays in float32, as the reference computes them. The reference's
`torch.cross` call names no axis and so takes the first axis of size 3, which is the frame axis for a
3-frame path; here the cross product is always over the xyz axis.
"""
from __future__ import annotations

import numbers
from pathlib import Path
from typing import Sequence, Union

import torch

from .errors import EasyAnimateError

POSE_COLUMNS = 19  # timestamp, fx, fy, cx, cy, two zeros, 12 matrix entries
SOURCE_ASPECT = 1280 / 720  # width / height of the videos the poses (and their intrinsics) come from
POSE_FPS = 24  # the frame rate the pose files are sampled at
MAX_POSE_FILE_BYTES = 16 * 2**20  # a 49-frame file is about 10 KB

Poses = Union[str, Path, torch.Tensor, Sequence[Sequence[float]]]


def pose_stride(fps: int) -> int:
    """Rows to step per video frame for a video played at `fps`: the predict script's 24 // fps (3 at 8 fps),
    at least 1. ComfyUI's nodes take every row (stride 1)."""
    if isinstance(fps, bool) or not isinstance(fps, numbers.Integral) or fps < 1:
        raise EasyAnimateError(f"fps must be a whole number ≥ 1; got {fps!r}.")
    return max(1, POSE_FPS // int(fps))


def read_pose_file(path: Union[str, Path]) -> torch.Tensor:
    """A CameraCtrl / RealEstate10K pose file -> (N, 19) float64 rows, every line checked (its number is
    named in the error). The first line is skipped; blank lines are ignored."""
    path = Path(path)
    if not path.is_file():
        raise EasyAnimateError(f"The camera pose file '{path}' {'is not a file' if path.exists() else 'does not exist'}.")
    size = path.stat().st_size
    if size > MAX_POSE_FILE_BYTES:
        raise EasyAnimateError(
            f"The camera pose file '{path}' is {size / 2**20:.1f} MiB, over the {MAX_POSE_FILE_BYTES / 2**20:g} MiB a "
            "pose file can be (one line of 19 numbers per frame); is it the right file?"
        )
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise EasyAnimateError(f"The camera pose file '{path}' is not a text file.") from None
    rows, places = [], []
    for number, line in enumerate(lines[1:], start=2):
        if line.strip():
            rows.append(_parse_line(line, f"'{path}', line {number}"))
            places.append(f"'{path}', line {number}")
    if not rows:
        raise EasyAnimateError(
            f"The camera pose file '{path}' has no pose lines (its first line is skipped; then one line per frame: "
            "timestamp fx fy cx cy 0 0 and the 3x4 world-to-camera matrix)."
        )
    return _checked(torch.tensor(rows, dtype=torch.float64), places)


def pose_rows(poses: Poses) -> torch.Tensor:
    """A pose file path, or rows (a (N, 19) tensor or array, or N sequences of 19 numbers) -> checked (N, 19)
    float64 rows; a bad row is named by its number (from 1)."""
    if isinstance(poses, (str, Path)):
        return read_pose_file(poses)
    if hasattr(poses, "shape"):  # a tensor or an array
        rows = torch.as_tensor(poses).detach().to("cpu", torch.float64)
        if rows.ndim != 2 or rows.shape[0] == 0:
            raise EasyAnimateError(f"Camera poses must be (frames, {POSE_COLUMNS}) rows; got shape {tuple(rows.shape)}.")
        if rows.shape[1] != POSE_COLUMNS:
            raise EasyAnimateError(f"pose row 1 {_wrong_count(rows.shape[1])}")
    else:
        parsed = []
        for number, row in enumerate(poses, start=1):
            values = list(row) if isinstance(row, (list, tuple)) else [row]
            if len(values) != POSE_COLUMNS:
                raise EasyAnimateError(f"pose row {number} {_wrong_count(len(values))}")
            try:
                parsed.append([float(v) for v in values])
            except (TypeError, ValueError):
                raise EasyAnimateError(f"pose row {number}: holds something that is not a number.") from None
        if not parsed:
            raise EasyAnimateError("No camera poses were given (one row of 19 numbers per frame).")
        rows = torch.tensor(parsed, dtype=torch.float64)
    return _checked(rows, [f"pose row {i}" for i in range(1, rows.shape[0] + 1)])


def _wrong_count(count: int) -> str:
    return (f"has {count} numbers; a pose has {POSE_COLUMNS}: timestamp fx fy cx cy 0 0 and the 3x4 "
            "world-to-camera matrix row by row.")


def _parse_line(line: str, where: str) -> list[float]:
    fields = line.split()
    if len(fields) != POSE_COLUMNS:
        raise EasyAnimateError(f"{where} {_wrong_count(len(fields))}")
    try:
        return [float(v) for v in fields]
    except ValueError:
        bad = next(v for v in fields if not _is_number(v))
        raise EasyAnimateError(f"{where}: {bad!r} is not a number.") from None


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def _checked(rows: torch.Tensor, places: list[str]) -> torch.Tensor:
    """Refuse non-finite values, non-positive focal lengths and matrices that cannot be inverted, naming the row."""
    for index, row in enumerate(rows):
        if not bool(torch.isfinite(row).all()):
            raise EasyAnimateError(f"{places[index]}: holds a value that is not finite (nan or inf).")
        if row[1] <= 0 or row[2] <= 0:
            raise EasyAnimateError(f"{places[index]}: the focal lengths fx, fy must be above 0; got {row[1]:g}, {row[2]:g}.")
        if abs(float(torch.linalg.det(row[7:].reshape(3, 4)[:, :3]))) < 1e-12:
            raise EasyAnimateError(f"{places[index]}: its world-to-camera rotation cannot be inverted (determinant 0).")
    return rows


def select_poses(rows: torch.Tensor, frames: int | None = None, stride: int = 1) -> torch.Tensor:
    """Every `stride`-th row from the first, the first `frames` of them (None: all)."""
    if isinstance(stride, bool) or not isinstance(stride, numbers.Integral) or stride < 1:
        raise EasyAnimateError(f"The pose stride must be a whole number ≥ 1; got {stride!r}.")
    chosen = rows[::stride]
    if frames is None:
        return chosen
    if isinstance(frames, bool) or not isinstance(frames, numbers.Integral) or frames < 1:
        raise EasyAnimateError(f"frames must be a whole number ≥ 1; got {frames!r}.")
    if len(chosen) < frames:
        with_stride = f" taking one row in {stride}" if stride > 1 else ""
        raise EasyAnimateError(
            f"The camera poses have {len(rows)} rows, which{with_stride} give {len(chosen)} frames; the video has "
            f"{frames}. Give more poses{', a smaller stride' if stride > 1 else ''} or fewer frames."
        )
    return chosen[:frames]


def pixel_intrinsics(rows: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(N, 4) float32 (fx, fy, cx, cy) in pixels of a height x width video. The focal length along the axis
    the 16:9 source is cropped on is rescaled so the other axis keeps its field of view."""
    fx, fy, cx, cy = (rows[:, i] for i in range(1, 5))
    if SOURCE_ASPECT > width / height:  # narrower than the source: its width was cropped
        fx = (height * SOURCE_ASPECT) * fx / width
    else:
        fy = (width / SOURCE_ASPECT) * fy / height
    return torch.stack([fx * width, fy * height, cx * width, cy * height], dim=1).float()


def relative_poses(rows: torch.Tensor) -> torch.Tensor:
    """(N, 4, 4) float32 camera-to-world matrices in the first camera's coordinates: the identity, then
    w2c_0 · c2w_i (the algebra in float64)."""
    w2c = torch.eye(4, dtype=torch.float64).repeat(len(rows), 1, 1)
    w2c[:, :3] = rows[:, 7:].reshape(-1, 3, 4)
    relative = w2c[0] @ torch.linalg.inv(w2c)
    relative[0] = torch.eye(4, dtype=torch.float64)
    return relative.float()


def plucker_rays(poses: Poses, height: int, width: int, *, frames: int | None = None, stride: int = 1) -> torch.Tensor:
    """Camera poses (a pose file or rows) -> Plücker rays (1, 6, F, height, width) float32, moment o × d first,
    then the direction d, per pixel centre: the `control_camera` a Control-Camera model takes.

    `frames`: the first F poses after the stride (None: all); `stride`: take every stride-th row (1, as
    ComfyUI; `pose_stride(fps)`, as the predict script). Every problem is refused before any compute.
    """
    for value, what in ((height, "height"), (width, "width")):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
            raise EasyAnimateError(f"The ray {what} must be a whole number of pixels ≥ 1; got {value!r}.")
    rows = select_poses(pose_rows(poses), frames, stride)
    intrinsics = pixel_intrinsics(rows, height, width)
    poses_c2w = relative_poses(rows)
    # Pixel centres, x along the width and y down the height.
    x = torch.arange(width, dtype=torch.float32) + 0.5
    y = torch.arange(height, dtype=torch.float32) + 0.5
    out = torch.empty(1, 6, len(rows), height, width, dtype=torch.float32)
    for index, ((fx, fy, cx, cy), c2w) in enumerate(zip(intrinsics, poses_c2w)):
        directions = torch.stack(torch.broadcast_tensors(((x - cx) / fx)[None, :], ((y - cy) / fy)[:, None],
                                                         torch.ones(height, width)), dim=-1)
        directions = directions / directions.norm(dim=-1, keepdim=True)
        world = directions @ c2w[:3, :3].T  # (H, W, 3): each direction rotated into the first camera's frame
        origin = c2w[:3, 3].expand_as(world)
        out[0, :3, index] = torch.cross(origin, world, dim=-1).permute(2, 0, 1)
        out[0, 3:, index] = world.permute(2, 0, 1)
    return out
