"""MuLTI entry points that take frames refuse non-finite values (they would make every score NaN)."""
from __future__ import annotations

import pytest
import torch

from easyanimate.errors import EasyAnimateError
from easyanimate.multi.model import MuLTI
from easyanimate.multi.preprocess import prepare_frames

from . import tiny_config


def test_prepare_frames_refuses_nan_frames():
    video = torch.rand(4, 32, 32, 3)
    video[2, 5, 5, 1] = float("nan")
    with pytest.raises(EasyAnimateError, match=r"MuLTI input video holds 1 non-finite value \(NaN\)"):
        prepare_frames(video, tiny_config())
    assert prepare_frames(torch.rand(4, 32, 32, 3), tiny_config()).shape == (1, 4, 3, 32, 32)


def test_encode_video_refuses_nan_frames_and_wrong_shapes():
    torch.manual_seed(0)
    model = MuLTI(tiny_config()).eval()
    frames = torch.randn(1, 4, 3, 32, 32)
    frames[0, 1, 0, 0, 0] = float("inf")
    with pytest.raises(EasyAnimateError, match=r"MuLTI video frames holds 1 non-finite value \(infinity\)"):
        model.encode_video(frames)
    with pytest.raises(EasyAnimateError, match=r"\(B, T, 3, S, S\).*got \(4, 3, 32, 32\)"):
        model.encode_video(torch.randn(4, 3, 32, 32))
