"""The package's figures as PNGs, drawn with Pillow (already a dependency; no matplotlib needed).

curves.png (training): the meta-training loss, the meta-training accuracy and the validation accuracy (95% interval
as error bars, the baselines of the run's saved evaluations as labelled horizontal lines) against the episode.
gates.png (`metalstm inspect`): per learner layer, the input-gate and forget-gate distributions across the inner
steps. inner_loss.png: the support loss and accuracy per inner step, the meta-learner beside plain SGD.
Every axis is scaled to its data (a fixed 0-1 axis flattens the one-point differences that matter), every series
is labelled where it is drawn, and every file is written to a temporary path and renamed.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from keras_metalstm.paths import replaced_in_place

WIDTH, HEIGHT = 1200, 420
MARGIN_LEFT, MARGIN_RIGHT, MARGIN_TOP, MARGIN_BOTTOM = 70, 20, 40, 45
HEADER = 30  # the line of text above the panels of gates.png and inner_loss.png
GATE_PANEL_WIDTH, GATE_PANEL_HEIGHT = 560, 220
TRAIN_COLOUR = (31, 119, 180)
VAL_COLOUR = (214, 39, 40)
INPUT_GATE_COLOUR = (31, 119, 180)
FORGET_GATE_COLOUR = (44, 160, 44)
# Series of one panel, in order: the meta-learner first (the colour it has in every figure), then the others.
SERIES_COLOURS = (
    (31, 119, 180),
    (255, 127, 14),
    (44, 160, 44),
    (148, 103, 189),
    (140, 86, 75),
    (127, 127, 127),
)
# An accuracy axis: within [0, 1], at least 2 points wide.
ACCURACY_BOUNDS = {"lower": 0.0, "upper": 1.0, "minimum_span": 0.02}
BAND_OPACITY = 60  # of 255: overlapping bands stay visible through each other
LABEL_HEIGHT = 12  # pixels per line of the default font


def data_range(values, lower=None, upper=None, minimum_span=1e-4, pad=0.05):
    """(low, high) spanning the finite `values` with `pad` of their span either side, at least `minimum_span`
    wide (a constant series still gets an axis), within [lower, upper] when given."""
    finite = [float(v) for v in values if math.isfinite(v)]
    if not finite:
        return (0.0, 1.0)
    low, high = min(finite), max(finite)
    if high - low < minimum_span:
        centre = (low + high) / 2
        low, high = centre - minimum_span / 2, centre + minimum_span / 2
    span = high - low
    low, high = low - pad * span, high + pad * span
    # A bound cuts the padding, never the span: shift the range back inside.
    if upper is not None and high > upper:
        low, high = low - (high - upper), upper
    if lower is not None and low < lower:
        low, high = lower, high + (lower - low)
        high = high if upper is None else min(high, upper)
    return (low, high)


def plot_training_curves(rows: list[dict], path: str | os.PathLike, baselines=()) -> Path:
    """Draw `rows` (metrics.jsonl records: kind train/val, episode, loss, accuracy[, ci95]) into `path`.

    `baselines`: {"label", "accuracy" (a fraction), "split", "episodes"} per baseline
    (keras_metalstm.evaluation.saved_baselines), drawn as horizontal lines on the validation panel.
    """
    train = [r for r in rows if r.get("kind") == "train"]
    val = [r for r in rows if r.get("kind") == "val" and "accuracy" in r]
    image = _canvas(WIDTH, HEIGHT)
    third = WIDTH // 3
    x_range = (0, max([r["episode"] for r in rows] + [1]))

    xs, losses = _series(train, "loss")
    y_range = data_range(losses, lower=0.0)
    axes = _Axes(image, (0, 0, third, HEIGHT), "meta-training loss (query set)", "episode", x_range, y_range)
    axes.line(xs, losses, TRAIN_COLOUR)

    xs, accuracies = _series(train, "accuracy")
    y_range = data_range(accuracies, **ACCURACY_BOUNDS)
    box = (third, 0, 2 * third, HEIGHT)
    axes = _Axes(image, box, "meta-training accuracy (query set)", "episode", x_range, y_range)
    axes.line(xs, accuracies, TRAIN_COLOUR)

    xs, means = _series(val, "accuracy")
    half_widths = [r.get("ci95", 0.0) for r in val]
    lows, highs = _interval(means, half_widths)
    title = "validation accuracy (95% interval)" + (", baselines dashed" if baselines else "")
    y_range = data_range(lows + highs + [b["accuracy"] for b in baselines], **ACCURACY_BOUNDS)
    axes = _Axes(image, (2 * third, 0, WIDTH, HEIGHT), title, "episode", x_range, y_range)
    axes.error_bars(xs, means, half_widths, VAL_COLOUR)
    axes.line(xs, means, VAL_COLOUR)
    if means:
        axes.end_label(xs, means, VAL_COLOUR, f"{100 * means[-1]:.1f}%")
    for colour, baseline in zip(SERIES_COLOURS[1:] * 2, baselines, strict=False):
        label = (
            f"{baseline['label']} {100 * baseline['accuracy']:.1f}% ({baseline['split']}, "
            f"{baseline['episodes']} episodes)"
        )
        axes.hline(baseline["accuracy"], colour, label)
    return _save(image, path)


def plot_gates(layers: list[dict], path: str | os.PathLike, note: str = "") -> Path:
    """gates.png: one row per learner layer, its input gate (left) and forget gate (right) across the inner
    steps: the median over the layer's coordinates as a line, the 10th to 90th percentile as a band.

    `layers`: [{"name", "input_gate": {"median", "p10", "p90"}, "forget_gate": {...}}], each statistic a list
    over the steps 1..T. `note` is written above the panels.
    """
    steps = len(layers[0]["input_gate"]["median"])
    image = _canvas(2 * GATE_PANEL_WIDTH, HEADER + len(layers) * GATE_PANEL_HEIGHT)
    _header(image, note or "line: median over the layer's coordinates; band: 10th to 90th percentile")
    panels = (
        ("input_gate", "input gate i_t (learning rate)", INPUT_GATE_COLOUR),
        ("forget_gate", "forget gate f_t (1 - shrinkage)", FORGET_GATE_COLOUR),
    )
    xs = list(range(1, steps + 1))
    for row, layer in enumerate(layers):
        top = HEADER + row * GATE_PANEL_HEIGHT
        for column, (gate, title, colour) in enumerate(panels):
            statistics = layer[gate]
            box = (column * GATE_PANEL_WIDTH, top, (column + 1) * GATE_PANEL_WIDTH, top + GATE_PANEL_HEIGHT)
            y_range = data_range([*statistics["p10"], *statistics["p90"], *statistics["median"]], 0.0, 1.0)
            axes = _Axes(image, box, f"{layer['name']}: {title}", "inner step", (1, max(steps, 2)), y_range)
            axes.band(xs, statistics["p10"], statistics["p90"], colour)
            axes.line(xs, statistics["median"], colour)
            median = statistics["median"][-1]
            axes.end_label(xs, statistics["median"], colour, f"median {_significant(median)}")
    return _save(image, path)


def plot_inner_loss(steps: list[int], curves: list[dict], path: str | os.PathLike, note: str = "") -> Path:
    """inner_loss.png: the support loss (left) and accuracy (right) per inner step, each curve's mean as a line
    and its 95% interval as a band, labelled at its end.

    `curves`: [{"label", "loss": {"mean", "ci95"}, "accuracy": {"mean", "ci95"}}], each value a list over
    `steps`.
    """
    image = _canvas(WIDTH, HEIGHT + HEADER)
    _header(image, note)
    half = WIDTH // 2
    panels = (
        ("loss", "support loss (cross-entropy)", {"lower": 0.0}),
        ("accuracy", "support accuracy", ACCURACY_BOUNDS),
    )
    for column, (key, title, bounds) in enumerate(panels):
        intervals = [_interval(curve[key]["mean"], curve[key]["ci95"]) for curve in curves]
        y_range = data_range([value for low, high in intervals for value in (*low, *high)], **bounds)
        box = (column * half, HEADER, (column + 1) * half, HEADER + HEIGHT)
        x_range = (steps[0], steps[-1])
        axes = _Axes(image, box, f"{title}, mean and 95% interval", "inner step", x_range, y_range)
        for colour, curve, (low, high) in zip(SERIES_COLOURS, curves, intervals, strict=False):
            axes.band(steps, low, high, colour)
            axes.line(steps, curve[key]["mean"], colour)
            axes.end_label(steps, curve[key]["mean"], colour, curve["label"])
    return _save(image, path)


# -------------------------------------------------------------------------------------------------- drawing
class _Axes:
    """One panel in `box` of `image`: frame, title, ticks and axis label, and data drawn in data coordinates."""

    def __init__(self, image, box, title, x_label, x_range, y_range):
        from PIL import ImageDraw

        self.image = image
        self.draw = ImageDraw.Draw(image)
        left, top, right, bottom = box
        self.x0, self.x1 = left + MARGIN_LEFT, right - MARGIN_RIGHT
        self.y0, self.y1 = top + MARGIN_TOP, bottom - MARGIN_BOTTOM
        self.x_range, self.y_range = x_range, y_range
        self._label_rows = []  # pixel rows of the labels drawn so far, so that the next one does not cover them
        self.draw.rectangle([self.x0, self.y0, self.x1, self.y1], outline="black")
        self.draw.text((self.x0, top + 12), title, fill="black")
        self.draw.text(((self.x0 + self.x1) // 2 - 3 * len(x_label), self.y1 + 25), x_label, fill="black")
        decimals = _decimals(y_range[1] - y_range[0])
        for i in range(5):
            value = y_range[0] + (y_range[1] - y_range[0]) * i / 4
            self.draw.line([self.x0 - 4, self.y(value), self.x0, self.y(value)], fill="black")
            self.draw.text((left + 5, self.y(value) - 6), f"{value:.{decimals}f}", fill="black")
        for value in _integer_ticks(*x_range):
            self.draw.line([self.x(value), self.y1, self.x(value), self.y1 + 4], fill="black")
            self.draw.text((self.x(value) - 3 * len(str(value)), self.y1 + 8), str(value), fill="black")

    def x(self, value):
        low, high = self.x_range
        return self.x0 + (self.x1 - self.x0) * (value - low) / max(high - low, 1e-12)

    def y(self, value):
        low, high = self.y_range
        return self.y1 - (self.y1 - self.y0) * (value - low) / max(high - low, 1e-12)

    def line(self, xs, ys, colour):
        """A polyline with a dot at every point; non-finite points are left out."""
        points = [(self.x(x), self.y(y)) for x, y in zip(xs, ys, strict=True) if math.isfinite(y)]
        if len(points) > 1:
            self.draw.line(points, fill=colour, width=2)
        for px, py in points:
            self.draw.ellipse([px - 2, py - 2, px + 2, py + 2], fill=colour)

    def error_bars(self, xs, ys, half_widths, colour):
        for x, y, half in zip(xs, ys, half_widths, strict=True):
            if half:
                self.draw.line([self.x(x), self.y(y - half), self.x(x), self.y(y + half)], fill=colour)

    def band(self, xs, lows, highs, colour):
        """The area between `lows` and `highs`, translucent over what is already drawn."""
        from PIL import Image, ImageDraw

        if len(xs) < 2 or not all(math.isfinite(v) for v in [*lows, *highs]):
            return
        # An interval may reach past a bounded axis (an accuracy's past 1): the band stops at the frame.
        outline = [(self.x(x), self.y(v)) for x, v in zip(xs, highs, strict=True)]
        outline += [(self.x(x), self.y(v)) for x, v in reversed(list(zip(xs, lows, strict=True)))]
        outline = [(x, min(max(y, self.y0), self.y1)) for x, y in outline]
        overlay = Image.new("RGBA", self.image.size, (0, 0, 0, 0))
        ImageDraw.Draw(overlay).polygon(outline, fill=(*colour, BAND_OPACITY))
        self.image.alpha_composite(overlay)

    def hline(self, value, colour, label):
        """A dashed horizontal line across the panel, labelled above its left end."""
        y = self.y(value)
        for start in range(int(self.x0), int(self.x1), 12):
            self.draw.line([start, y, min(start + 7, self.x1), y], fill=colour, width=2)
        self._label(self.x0 + 4, y - LABEL_HEIGHT - 1, label, colour)

    def end_label(self, xs, ys, colour, text):
        """`text` beside the last finite point of a series, inside the frame."""
        last = [(x, y) for x, y in zip(xs, ys, strict=True) if math.isfinite(y)]
        if last:
            width = self.draw.textlength(text)
            self._label(self.x1 - width - 4, self.y(last[-1][1]) - LABEL_HEIGHT - 3, text, colour)

    def _label(self, x, y, text, colour):
        # Where a label would cover an earlier one it moves a row down or up, the nearest free row in the frame.
        top, bottom = self.y0 + 2, self.y1 - LABEL_HEIGHT - 2
        wanted = min(max(y, top), bottom)
        rows = [wanted + shift * LABEL_HEIGHT for distance in range(8) for shift in (distance, -distance)]
        free = [
            row
            for row in rows
            if top <= row <= bottom and all(abs(row - r) >= LABEL_HEIGHT for r in self._label_rows)
        ]
        y = free[0] if free else wanted
        self._label_rows.append(y)
        self.draw.text((x, y), text, fill=colour)


def _canvas(width, height):
    from PIL import Image

    return Image.new("RGBA", (width, height), "white")


def _header(image, text):
    from PIL import ImageDraw

    ImageDraw.Draw(image).text((MARGIN_LEFT, 10), text, fill="black")


def _save(image, path) -> Path:
    with replaced_in_place(path) as tmp:
        image.convert("RGB").save(tmp, format="PNG")
    return Path(path)


def _series(rows, key):
    """(episodes, values) of the metrics rows that hold `key`."""
    rows = [r for r in rows if key in r]
    return [r["episode"] for r in rows], [r[key] for r in rows]


def _interval(means, half_widths):
    """The lower and upper ends of intervals mean +- half width, as two lists."""
    pairs = list(zip(means, half_widths, strict=True))
    return [mean - half for mean, half in pairs], [mean + half for mean, half in pairs]


def _integer_ticks(low, high, most=6):
    step = max(1, math.ceil((high - low) / (most - 1)))
    return list(range(int(math.ceil(low)), int(high) + 1, step))


def _decimals(span):
    """Decimals that tell apart y ticks a quarter of `span` apart."""
    step = span / 4
    return min(6, max(0, 1 - math.floor(math.log10(step)))) if step > 0 else 2


def _significant(value):
    return f"{value:.4f}" if abs(value) >= 0.1 else f"{value:.3g}"
