"""Loss curves and captioned image grids for reports, drawn with PIL.

Single steps of a diffusion loss are noise (the timestep is drawn per step), so a curve is shown as
the mean over a sliding window of steps next to the bucket values it is made of. The input is a
``purecc.loss_curve.LossCurve`` dict (what checkpoints and adapter manifests keep): its points are
bucket means of ``bucket`` steps, so a window of ``w`` steps spans ``w / bucket`` points. Drawn with
PIL because matplotlib is not a dependency of the project and a line plot needs only a few calls.
"""

from __future__ import annotations

import math
import textwrap
from pathlib import Path
from typing import Mapping, Sequence

from PIL import Image, ImageDraw, ImageFont

COLOURS = ((31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189))
FAINT = 0.35     # how much of its colour a raw (unsmoothed) line keeps


def sliding_mean(values: Sequence[float], window: int) -> list[float]:
    """Trailing mean over ``window`` values (fewer at the start), one output per input."""
    if window < 1:
        raise ValueError(f"window: {window} must be >= 1")
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def curve_series(curve: Mapping, window_steps: int = 20) -> dict | None:
    """The numbers of one stage's curve: steps, bucket means and their sliding mean (None if empty)."""
    points = curve.get("points") or []
    if not points:
        return None
    bucket = max(1, int(curve.get("bucket", 1)))
    window = max(1, round(window_steps / bucket))
    steps, loss = [int(p[1]) for p in points], [float(p[2]) for p in points]
    return {"steps": steps, "loss": loss, "mean": sliding_mean(loss, window), "window_steps": window * bucket,
            "bucket": bucket, "total_steps": int(curve.get("steps", steps[-1]))}


def _font(size: int) -> ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def _fade(colour: tuple[int, int, int]) -> tuple[int, int, int]:
    return tuple(int(255 - (255 - c) * FAINT) for c in colour)


def _panel(draw: ImageDraw.ImageDraw, box: tuple[int, int, int, int], title: str, series: dict,
           colour: tuple[int, int, int]) -> None:
    """One stage's axes, the raw bucket means (faint) and the sliding mean, with min/max labels."""
    x0, y0, x1, y1 = box
    font = _font(12)
    draw.text((x0, y0 - 18), title, fill="black", font=font)
    draw.rectangle(box, outline=(120, 120, 120))
    values = series["loss"] + series["mean"]
    lo, hi = min(values), max(values)
    if math.isclose(lo, hi):
        lo, hi = lo - 0.5, hi + 0.5
    s0, s1 = 0, max(series["total_steps"], series["steps"][-1], 1)

    def xy(step: int, v: float) -> tuple[float, float]:
        return (x0 + (x1 - x0) * (step - s0) / (s1 - s0), y1 - (y1 - y0) * (v - lo) / (hi - lo))

    for key, fill, width in (("loss", _fade(colour), 1), ("mean", colour, 2)):
        pts = [xy(s, v) for s, v in zip(series["steps"], series[key])]
        if len(pts) == 1:
            draw.ellipse((pts[0][0] - 2, pts[0][1] - 2, pts[0][0] + 2, pts[0][1] + 2), fill=fill)
        else:
            draw.line(pts, fill=fill, width=width)
    small = _font(10)
    draw.text((x0 - 4, y0), f"{hi:.3g}", fill="black", font=small, anchor="ra")
    draw.text((x0 - 4, y1), f"{lo:.3g}", fill="black", font=small, anchor="rd")
    draw.text((x0, y1 + 4), "0", fill="black", font=small)
    draw.text((x1, y1 + 4), f"step {s1}", fill="black", font=small, anchor="ra")
    draw.text((x1, y0 + 4), f"mean of {series['window_steps']} steps", fill=colour, font=small, anchor="ra")


def plot_loss_curves(stages: Mapping[str, dict | None], path: str | Path, title: str,
                     size: tuple[int, int] = (360, 220)) -> Path:
    """A PNG with one panel per stage (``{"stage 1": series, ...}`` from ``curve_series``), side by side;
    a stage without a curve gets an empty panel saying so."""
    w, h = size
    sheet = Image.new("RGB", (w * len(stages), h + 30), "white")
    draw = ImageDraw.Draw(sheet)
    draw.text((8, 6), title, fill="black", font=_font(14))
    for i, (name, series) in enumerate(stages.items()):
        box = (i * w + 50, 52, (i + 1) * w - 12, h)
        if series is None:
            draw.text((box[0], box[1] - 18), f"{name}: no curve", fill="gray", font=_font(12))
            continue
        _panel(draw, box, name, series, COLOURS[i % len(COLOURS)])
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    return path


def captioned_grid(tiles: Sequence[tuple[Image.Image, str, str]], path: str | Path, tile: int = 192,
                   caption_lines: int = 5, gap: int = 6) -> Path:
    """One row of images, each upscaled to ``tile`` px with its name above and its prompt under it
    (wrapped to the tile's width, at most ``caption_lines`` lines, ``...`` when cut)."""
    font, name_font = _font(11), _font(12)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    line_h = probe.textbbox((0, 0), "Ag", font=font)[3] + 3
    chars = max(8, int(tile / max(1.0, probe.textlength("abcdefghij", font=font) / 10)) - 1)
    head, foot = 22, caption_lines * line_h + 8
    step = tile + gap
    sheet = Image.new("RGB", (step * len(tiles) - gap, head + tile + foot), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (img, name, prompt) in enumerate(tiles):
        x = i * step
        sheet.paste(img.convert("RGB").resize((tile, tile), Image.Resampling.NEAREST), (x, head))
        draw.text((x + 4, 4), name, fill="black", font=name_font)
        lines = textwrap.wrap(prompt, chars) or [""]
        if len(lines) > caption_lines:
            lines = lines[:caption_lines - 1] + [lines[caption_lines - 1][:chars - 3] + "..."]
        for k, line in enumerate(lines):
            draw.text((x + 4, head + tile + 4 + k * line_h), line, fill=(40, 40, 40), font=font)
    path = Path(path)
    sheet.save(path)
    return path
