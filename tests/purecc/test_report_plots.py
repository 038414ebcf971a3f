"""Report plots: sliding means of a bounded loss curve, the plot PNG, the captioned grid."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from purecc.loss_curve import LossCurve
from purecc.report_plots import captioned_grid, curve_series, plot_loss_curves, sliding_mean


def test_sliding_mean_is_a_trailing_window():
    assert sliding_mean([1, 3, 5, 7], 2) == [1, 2, 4, 6]
    assert sliding_mean([2.0], 5) == [2.0]
    with pytest.raises(ValueError, match="window"):
        sliding_mean([1], 0)


def test_curve_series_windows_in_steps_over_buckets():
    c = LossCurve()
    for i in range(300):
        c.add(float(i % 2))          # 0, 1, 0, 1...: every window of even length averages 0.5
    s = curve_series(c.to_dict(), window_steps=20)
    assert s["bucket"] == 4 and s["window_steps"] == 20 and s["total_steps"] == 300
    assert s["steps"][-1] == 300 and len(s["steps"]) == len(s["loss"]) == len(s["mean"]) <= 128
    assert all(abs(v - 0.5) < 1e-9 for v in s["mean"][5:])
    assert curve_series({"points": []}) is None


def test_plot_draws_one_panel_per_stage(tmp_path):
    c = LossCurve()
    for i in range(50):
        c.add(1.0 / (1 + i))
    path = plot_loss_curves({"stage 1": curve_series(c.to_dict()), "stage 2": None}, tmp_path / "p.png", "x")
    img = np.asarray(Image.open(path).convert("RGB")).astype(int)
    assert img.shape[1] == 2 * 360
    left, right = img[:, :360], img[:, 360:]
    blue = (np.abs(left - [31, 119, 180]).sum(axis=2) < 30).sum()
    assert blue > 100                                   # the smoothed line of stage 1 is drawn
    assert (np.abs(right - [31, 119, 180]).sum(axis=2) < 30).sum() == 0   # stage 2: no curve, no line


def test_captioned_grid_writes_the_prompt_under_each_image(tmp_path):
    tiles = [(Image.new("RGB", (16, 16), c), f"t{i}", "a long prompt " * (i * 8 + 1))
             for i, c in enumerate(("red", "blue"))]
    path = captioned_grid(tiles, tmp_path / "g.png", tile=100, caption_lines=3)
    img = np.asarray(Image.open(path).convert("RGB")).astype(int)
    assert img.shape[1] == 2 * 100 + 6
    assert (img[22 + 50, 50] == [255, 0, 0]).all() and (img[22 + 50, 106 + 50] == [0, 0, 255]).all()
    caption = img[22 + 100:, :]                       # below the images: dark text pixels in both columns
    assert (caption[:, :100].sum(axis=2) < 300).sum() > 20 and (caption[:, 106:].sum(axis=2) < 300).sum() > 20
    # the longer prompt wraps onto more caption lines than the short one
    rows_with_text = lambda part: int(((part.sum(axis=2) < 300).sum(axis=1) > 0).sum())  # noqa: E731
    assert rows_with_text(caption[:, 106:]) > rows_with_text(caption[:, :100])
