"""Training curves as a PNG, drawn with Pillow (already a dependency; no matplotlib needed).

Two panels side by side: loss (train) and accuracy (train and validation, with the validation 95% interval as
error bars), against the episode number.
"""

from __future__ import annotations

import os
from pathlib import Path

WIDTH, HEIGHT = 1000, 420
MARGIN_LEFT, MARGIN_RIGHT, MARGIN_TOP, MARGIN_BOTTOM = 60, 20, 40, 45
TRAIN_COLOUR = (31, 119, 180)
VAL_COLOUR = (214, 39, 40)


def plot_training_curves(rows: list[dict], path: str | os.PathLike) -> Path:
    """Draw `rows` (metrics.jsonl records: kind train/val, episode, loss, accuracy[, ci95]) into `path` (PNG,
    written to a temporary file and renamed)."""
    from PIL import Image, ImageDraw

    path = Path(path)
    train = [r for r in rows if r.get("kind") == "train"]
    val = [r for r in rows if r.get("kind") == "val"]
    image = Image.new("RGB", (WIDTH, HEIGHT), "white")
    draw = ImageDraw.Draw(image)
    half = WIDTH // 2
    episodes = [r["episode"] for r in rows] or [0, 1]
    x_range = (0, max(max(episodes), 1))
    losses = [r["loss"] for r in train]
    loss_range = (0.0, max(losses) * 1.05 if losses else 1.0)
    _panel(
        draw,
        (0, 0, half, HEIGHT),
        "meta-training loss (query set)",
        x_range,
        loss_range,
        [(train, "loss", TRAIN_COLOUR, "train")],
    )
    _panel(
        draw,
        (half, 0, WIDTH, HEIGHT),
        "accuracy (query set)",
        x_range,
        (0.0, 1.0),
        [(train, "accuracy", TRAIN_COLOUR, "train"), (val, "accuracy", VAL_COLOUR, "validation")],
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}.png")
    image.save(tmp, format="PNG")
    os.replace(tmp, path)
    return path


def _panel(draw, box, title, x_range, y_range, series):
    left, top, right, bottom = box
    x0, x1 = left + MARGIN_LEFT, right - MARGIN_RIGHT
    y0, y1 = top + MARGIN_TOP, bottom - MARGIN_BOTTOM
    draw.rectangle([x0, y0, x1, y1], outline="black")
    draw.text((x0, top + 12), title, fill="black")
    draw.text(((x0 + x1) // 2 - 20, y1 + 25), "episode", fill="black")

    def sx(v):
        return x0 + (x1 - x0) * (v - x_range[0]) / max(x_range[1] - x_range[0], 1e-12)

    def sy(v):
        return y1 - (y1 - y0) * (v - y_range[0]) / max(y_range[1] - y_range[0], 1e-12)

    for i in range(5):
        fy = y_range[0] + (y_range[1] - y_range[0]) * i / 4
        fx = x_range[0] + (x_range[1] - x_range[0]) * i / 4
        draw.line([x0 - 4, sy(fy), x0, sy(fy)], fill="black")
        draw.text((left + 5, sy(fy) - 6), f"{fy:.2f}", fill="black")
        draw.line([sx(fx), y1, sx(fx), y1 + 4], fill="black")
        draw.text((sx(fx) - 12, y1 + 8), f"{int(fx)}", fill="black")
    legend_y = top + 12
    for rows, key, colour, label in series:
        points = [(sx(r["episode"]), sy(r[key])) for r in rows if key in r]
        if len(points) > 1:
            draw.line(points, fill=colour, width=2)
        for r, (px, py) in zip(rows, points, strict=False):
            draw.ellipse([px - 2, py - 2, px + 2, py + 2], fill=colour)
            if "ci95" in r:
                draw.line([px, sy(r[key] - r["ci95"]), px, sy(r[key] + r["ci95"])], fill=colour)
        draw.text((x1 - 150, legend_y), f"-- {label}", fill=colour)
        legend_y += 14
