"""The eight shape classes of the synthetic dataset as outlines, and their random placement.

Geometry only (numpy polygons): the styles that draw them live in `synth.py`.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

Poly = np.ndarray  # (k, 2) float array of x, y points; y grows downwards


# ----------------------------------------------------------------------------- shapes


def _ring(n: int, rx: float = 1.0, ry: float = 1.0, start: float = 0.0) -> Poly:
    t = start + np.linspace(0.0, 2.0 * math.pi, n, endpoint=False)
    return np.stack([rx * np.cos(t), ry * np.sin(t)], axis=1)


def _circle() -> tuple[list[Poly], list[Poly]]:
    return [_ring(48)], []


def _square() -> tuple[list[Poly], list[Poly]]:
    return [np.array([(-0.8, -0.8), (0.8, -0.8), (0.8, 0.8), (-0.8, 0.8)])], []


def _triangle() -> tuple[list[Poly], list[Poly]]:
    pts = _ring(3, start=-math.pi / 2) * 1.05
    pts[:, 1] += 0.22  # centre the bounding box
    return [pts], []


def _star() -> tuple[list[Poly], list[Poly]]:
    t = -math.pi / 2 + np.arange(10) * math.pi / 5
    r = np.where(np.arange(10) % 2 == 0, 1.0, 0.42)
    pts = np.stack([r * np.cos(t), r * np.sin(t)], axis=1)
    pts[:, 1] += 0.1
    return [pts], []


def _cross() -> tuple[list[Poly], list[Poly]]:
    a, b = 0.28, 0.9
    pts = [
        (-a, -b),
        (a, -b),
        (a, -a),
        (b, -a),
        (b, a),
        (a, a),
        (a, b),
        (-a, b),
        (-a, a),
        (-b, a),
        (-b, -a),
        (-a, -a),
    ]
    return [np.array(pts)], []


def _heart() -> tuple[list[Poly], list[Poly]]:
    t = np.linspace(0.0, 2.0 * math.pi, 56, endpoint=False)
    x = 16 * np.sin(t) ** 3
    y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
    pts = np.stack([x, y], axis=1) / 16.5
    pts[:, 1] += 0.1
    return [pts], []


def _moon() -> tuple[list[Poly], list[Poly]]:
    # Outer circle R=1 at the origin minus an inner circle r at (d, 0): a left-facing crescent.
    big_r, r, d = 1.0, 0.82, 0.5
    xi = (big_r**2 - r**2 + d**2) / (2 * d)
    yi = math.sqrt(big_r**2 - xi**2)
    a0 = math.atan2(yi, xi)
    outer_t = np.linspace(a0, 2 * math.pi - a0, 30)
    outer = np.stack([big_r * np.cos(outer_t), big_r * np.sin(outer_t)], axis=1)
    b0 = math.atan2(yi, xi - d)
    inner_t = np.linspace(2 * math.pi - b0, b0, 24)[1:-1]
    inner = np.stack([d + r * np.cos(inner_t), r * np.sin(inner_t)], axis=1)
    pts = np.concatenate([outer, inner])
    pts[:, 0] += 0.22
    return [pts], []


def _house() -> tuple[list[Poly], list[Poly]]:
    body = [
        (-0.7, 0.9),
        (0.7, 0.9),
        (0.7, -0.1),
        (0.92, -0.1),
        (0.6, -0.38),
        (0.6, -0.82),
        (0.4, -0.82),
        (0.4, -0.56),
        (0.0, -0.92),
        (-0.92, -0.1),
        (-0.7, -0.1),
    ]
    door = [(-0.18, 0.9), (-0.18, 0.38), (0.18, 0.38), (0.18, 0.9)]
    return [np.array(body)], [np.array(door)]


SHAPES: dict[str, Callable[[], tuple[list[Poly], list[Poly]]]] = {
    "circle": _circle,
    "cross": _cross,
    "heart": _heart,
    "house": _house,
    "moon": _moon,
    "square": _square,
    "star": _star,
    "triangle": _triangle,
}
# How far each class may be rotated, in degrees (the moon looks like a moon at any angle).
_MAX_ROT = {"moon": 180.0}
_DEFAULT_ROT = 30.0


def place(
    class_name: str, rng: np.random.Generator, canvas: int
) -> tuple[list[Poly], list[Poly], tuple[float, float], float]:
    """Random scale, squash, rotation, mirror and position, kept inside the canvas."""
    polys, details = SHAPES[class_name]()
    radius = canvas * rng.uniform(0.22, 0.36)
    squash = rng.uniform(0.9, 1.1)
    rot = math.radians(rng.uniform(-1.0, 1.0) * _MAX_ROT.get(class_name, _DEFAULT_ROT))
    mirror = -1.0 if rng.random() < 0.5 else 1.0
    c, s = math.cos(rot), math.sin(rot)
    mat = np.array([[c, -s], [s, c]]) @ np.diag([mirror * radius * squash, radius / squash])
    polys = [p @ mat.T for p in polys]
    details = [p @ mat.T for p in details]
    allpts = np.concatenate(polys)
    lo, hi = allpts.min(axis=0), allpts.max(axis=0)
    margin = canvas * 0.06
    offs = []
    for k in range(2):
        low, high = margin - lo[k], canvas - margin - hi[k]
        offs.append(rng.uniform(low, high) if high > low else (low + high) / 2)
    shift = np.array(offs)
    polys = [p + shift for p in polys]
    details = [p + shift for p in details]
    centre = (float((lo[0] + hi[0]) / 2 + shift[0]), float((lo[1] + hi[1]) / 2 + shift[1]))
    return polys, details, centre, radius


