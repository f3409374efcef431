"""Draw a Scene as a small top-down RGB image (64x64 by default), deterministically.

Made to be read by a tiny vision tower with 8x8 patches: flat saturated colours, no noise or
anti-aliasing, fixed sizes (car 8x11 px, truck 12x13, pedestrian a 4x6 magenta figure), one
lane = 16 px, one row = 14 px. Layout, top to bottom: the crosswalk band (8 px), then the
``far``, ``near``, ``beside`` (ego level) and ``behind`` rows. The ego car is the green one.
The traffic light stands on the right sidewalk next to the crosswalk band: red lamp on top,
yellow in the middle, green at the bottom, only the lit lamp coloured.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from .scene import ROWS, Scene

SIZE = 64
LANE_W = 16
BAND_H = 8
ROW_H = 14

RGB = {
    "sidewalk": (176, 164, 140),
    "road": (92, 92, 92),
    "marking": (215, 215, 215),
    "crosswalk": (240, 240, 240),
    "windshield": (130, 190, 230),
    "ego": (30, 200, 60),
    "pedestrian": (230, 40, 200),
    "housing": (24, 24, 24),
    "lamp_off": (64, 64, 64),
    "red": (220, 30, 30),
    "blue": (40, 80, 230),
    "white": (250, 250, 250),
    "black": (12, 12, 12),
    "yellow": (240, 220, 30),
}
LAMPS = {"red": (255, 0, 0), "yellow": (255, 210, 0), "green": (0, 255, 0)}

_PEDESTRIAN = np.array([
    [0, 1, 1, 0],
    [0, 1, 1, 0],
    [1, 1, 1, 1],
    [1, 1, 1, 1],
    [0, 1, 1, 0],
    [1, 0, 0, 1],
], dtype=bool)


def road_left(n_lanes: int) -> int:
    """x of the road's left edge (the road is centred)."""
    return (SIZE - LANE_W * n_lanes) // 2


def row_top(row: str) -> int:
    return BAND_H + ROW_H * ROWS.index(row)


def _rect(img: np.ndarray, x0: int, y0: int, w: int, h: int, colour) -> None:
    img[y0:y0 + h, x0:x0 + w] = colour


def _vehicle(img: np.ndarray, x_lane: int, y_row: int, kind: str, colour) -> None:
    """A car or truck facing up, windshield at its front (top)."""
    if kind == "truck":
        x0, y0, w, h = x_lane + 2, y_row, 12, 13
        _rect(img, x0, y0, w, h, colour)
        _rect(img, x0, y0 + 4, w, 1, RGB["road"])  # gap between cab and trailer
    else:
        x0, y0, w, h = x_lane + 4, y_row + 1, 8, 11
        _rect(img, x0, y0, w, h, colour)
    _rect(img, x0 + 1, y0 + 1, w - 2, 1, RGB["windshield"])


def _pedestrian(img: np.ndarray, x0: int, y0: int) -> None:
    img[y0:y0 + 6, x0:x0 + 4][_PEDESTRIAN] = RGB["pedestrian"]


def render(scene: Scene) -> Image.Image:
    """The scene as a ``SIZE`` x ``SIZE`` RGB image; same scene, same pixels."""
    img = np.empty((SIZE, SIZE, 3), dtype=np.uint8)
    img[:] = RGB["sidewalk"]
    left = road_left(scene.n_lanes)
    right = left + LANE_W * scene.n_lanes
    _rect(img, left, 0, right - left, SIZE, RGB["road"])
    for k in range(1, scene.n_lanes):  # dashed lane dividers below the band
        x = left + LANE_W * k
        for y in range(BAND_H, SIZE, 6):
            _rect(img, x, y, 1, 3, RGB["marking"])
    if scene.crosswalk:
        for x in range(left + 1, right - 1, 4):
            _rect(img, x, 1, 2, BAND_H - 2, RGB["crosswalk"])
    if scene.light != "none":
        _rect(img, right + 1, 0, 6, 16, RGB["housing"])
        for i, lamp in enumerate(("red", "yellow", "green")):
            on = lamp == scene.light
            _rect(img, right + 2, 1 + 5 * i, 4, 4, LAMPS[lamp] if on else RGB["lamp_off"])
    for v in scene.vehicles:
        _vehicle(img, left + LANE_W * v.lane, row_top(v.row), v.kind, RGB[v.colour])
    _vehicle(img, left + LANE_W * scene.ego_lane, row_top("beside"), "car", RGB["ego"])
    for p in scene.pedestrians:
        if p.crossing:
            _pedestrian(img, left + LANE_W * p.lane + 6, 1)
        else:
            _pedestrian(img, left - 6, row_top(p.row) + 4)
    return Image.fromarray(img, "RGB")


__all__ = ["render", "road_left", "row_top", "SIZE", "RGB"]
