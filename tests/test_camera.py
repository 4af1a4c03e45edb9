"""Camera poses -> Plücker rays (easyanimate/camera.py) against a per-pixel float64 computation written here from
the pose-file format, the stride rule, and bad pose files refused with their line numbers."""
import numpy as np
import pytest
import torch

from easyanimate.camera import plucker_rays, pose_stride, read_pose_file
from easyanimate.errors import EasyAnimateError


def random_rows(frames: int, seed: int = 0) -> np.ndarray:
    """Pose rows: timestamp, normalised intrinsics, 0 0, a world-to-camera [R | t] with a random rotation."""
    rng = np.random.default_rng(seed)
    rows = []
    for index in range(frames):
        q, r = np.linalg.qr(rng.normal(size=(3, 3)))
        rotation = q * np.sign(np.diag(r))  # a proper orthonormal matrix
        if np.linalg.det(rotation) < 0:
            rotation[:, 0] *= -1
        w2c = np.concatenate([rotation, rng.normal(size=(3, 1))], axis=1)
        intrinsics = [rng.uniform(0.4, 0.6), rng.uniform(0.7, 1.0), rng.uniform(0.45, 0.55), rng.uniform(0.45, 0.55)]
        rows.append([index / 24, *intrinsics, 0.0, 0.0, *w2c.reshape(-1)])
    return np.array(rows)


def write_pose_file(path, rows, header="https://www.youtube.com/watch?v=example"):
    lines = [header] + [" ".join(repr(float(v)) for v in row) for row in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


def rays_by_pixel(rows: np.ndarray, height: int, width: int) -> np.ndarray:
    """(F, 6, H, W) float64, one pixel at a time: the intrinsics rescaled from the 1280x720 source (the cropped
    axis' focal length), poses relative to the first camera, the ray through each pixel centre, [o × d, d]."""
    out = np.zeros((len(rows), 6, height, width))
    w2c_first = np.vstack([rows[0, 7:].reshape(3, 4), [0, 0, 0, 1]])
    for f, row in enumerate(rows):
        fx, fy, cx, cy = row[1:5]
        if 1280 / 720 > width / height:
            fx = fx * (height * 1280 / 720) / width
        else:
            fy = fy * (width * 720 / 1280) / height
        fx, fy, cx, cy = fx * width, fy * height, cx * width, cy * height
        w2c = np.vstack([row[7:].reshape(3, 4), [0, 0, 0, 1]])
        c2w = np.eye(4) if f == 0 else w2c_first @ np.linalg.inv(w2c)
        for i in range(height):
            for j in range(width):
                d = np.array([(j + 0.5 - cx) / fx, (i + 0.5 - cy) / fy, 1.0])
                d = c2w[:3, :3] @ (d / np.linalg.norm(d))
                out[f, :3, i, j] = np.cross(c2w[:3, 3], d)
                out[f, 3:, i, j] = d
    return out


@pytest.mark.parametrize("frames,height,width", [(3, 4, 6), (2, 4, 8), (4, 5, 3)],
                         ids=["three-frames-narrow", "two-frames-wide", "four-frames-tall"])
def test_rays_match_a_per_pixel_float64_computation(tmp_path, frames, height, width):
    """Three frames: the reference's `torch.cross` without an axis would take the frame axis there."""
    rows = random_rows(frames, seed=frames)
    rays = plucker_rays(write_pose_file(tmp_path / "poses.txt", rows), height, width)
    assert rays.shape == (1, 6, frames, height, width) and rays.dtype == torch.float32
    expected = rays_by_pixel(rows, height, width)
    np.testing.assert_allclose(rays[0].permute(1, 0, 2, 3).numpy(), expected, rtol=0, atol=2e-5)
    assert torch.equal(plucker_rays(rows.tolist(), height, width), rays)
    assert torch.equal(plucker_rays(torch.from_numpy(rows), height, width), rays)


def test_stride_and_frame_count_pick_rows_as_the_predict_script(tmp_path):
    rows = random_rows(10, seed=3)
    path = write_pose_file(tmp_path / "poses.txt", rows)
    assert pose_stride(8) == 3 and pose_stride(24) == 1 and pose_stride(30) == 1
    strided = plucker_rays(path, 4, 6, frames=3, stride=3)
    assert torch.equal(strided, plucker_rays(rows[[0, 3, 6]], 4, 6))
    assert torch.equal(plucker_rays(path, 4, 6, frames=2), plucker_rays(rows[:2], 4, 6))


def test_the_first_frame_looks_down_its_own_axis_from_the_origin(tmp_path):
    rays = plucker_rays(random_rows(2, seed=4), 6, 8)
    assert torch.equal(rays[0, :3, 0], torch.zeros(3, 6, 8))  # o = 0 for the first camera: no moment
    assert torch.allclose(rays[0, 3:, 0].norm(dim=0), torch.ones(6, 8))


BAD_FILES = [
    ("a short line", ["0 0.5 0.9 0.5 0.5 0 0 1 0 0 0 0 1 0 0 0 0 1"], "line 2 has 18 numbers; a pose has 19"),
    ("not a number", ["0 0.5 0.9 0.5 0.5 0 0 1 0 0 0 0 1 0 0 0 0 1 x"], "line 2: 'x' is not a number"),
    ("not finite", ["0 0.5 0.9 0.5 0.5 0 0 1 0 0 0 0 1 0 0 0 0 1 0",
                    "0 0.5 0.9 0.5 0.5 0 0 1 0 0 nan 0 1 0 0 0 0 1 0"], "line 3: holds a value that is not finite"),
    ("zero focal length", ["0 0 0.9 0.5 0.5 0 0 1 0 0 0 0 1 0 0 0 0 1 0"], "line 2: the focal lengths fx, fy"),
    ("singular matrix", ["0 0.5 0.9 0.5 0.5 0 0 1 0 0 0 1 0 0 0 0 0 1 0"], "line 2: its world-to-camera rotation"),
    ("no poses", [], "has no pose lines"),
]


@pytest.mark.parametrize("lines,words", [b[1:] for b in BAD_FILES], ids=[b[0] for b in BAD_FILES])
def test_bad_pose_files_are_refused_naming_the_line(tmp_path, lines, words):
    path = tmp_path / "poses.txt"
    path.write_text("\n".join(["header"] + lines) + "\n")
    with pytest.raises(EasyAnimateError, match=words):
        read_pose_file(path)


def test_too_few_poses_for_the_frames_are_refused(tmp_path):
    path = write_pose_file(tmp_path / "poses.txt", random_rows(5))
    with pytest.raises(EasyAnimateError, match="have 5 rows, which taking one row in 3 give 2 frames; the video has 3"):
        plucker_rays(path, 4, 6, frames=3, stride=3)
    with pytest.raises(EasyAnimateError, match="have 5 rows, which give 5 frames; the video has 9"):
        plucker_rays(path, 4, 6, frames=9)


def test_bad_rows_and_arguments_are_refused():
    rows = random_rows(3).tolist()
    rows[1] = rows[1][:-1]
    with pytest.raises(EasyAnimateError, match="pose row 2 has 18 numbers"):
        plucker_rays(rows, 4, 6)
    with pytest.raises(EasyAnimateError, match="pose stride must be a whole number"):
        plucker_rays(random_rows(3), 4, 6, stride=0)
    with pytest.raises(EasyAnimateError, match="ray height must be a whole number"):
        plucker_rays(random_rows(3), 0, 6)
    with pytest.raises(EasyAnimateError, match="does not exist"):
        read_pose_file("no-such-poses.txt")
