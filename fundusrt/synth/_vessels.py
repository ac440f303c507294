"""The retinal vessel tree: grown from the optic disc as random walks, rasterised as soft capsules.

Growth happens in eye coordinates (u towards the temporal side, v up, in units of the FOV radius,
origin at the disc centre) so one seed gives the same tree at any image size and for either eye.
Four arcades leave the disc (superior/inferior x temporal/nasal), each an artery and a vein; the
temporal arcades arch around the macula, branches spawn at random intervals and thin out, and
nothing enters the foveal avascular zone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from fundusrt.synth._anatomy import Anatomy, WorkGrid

STEP = 0.018  # walk step, in FOV radii
TAPER = 0.994  # width kept per step
MIN_WIDTH = 0.0025  # vessels end below this diameter, in FOV radii
FAZ_RADIUS = 0.09  # foveal avascular zone, in FOV radii
MAX_DEPTH = 2
FULL_CONTRAST_WIDTH = 0.011  # vessels at least this wide (FOV radii) are drawn at full contrast
MIN_CONTRAST = 0.4
MAX_STEPS = 160


@dataclass(frozen=True)
class Vessel:
    """One unbranched vessel segment chain.

    Attributes:
        kind: "artery" or "vein".
        points: (n, 2) image coordinates (x, y) of the centre line.
        widths: (n,) diameters in image pixels at each point.
        opacity: (n,) 0-1; trunks fade in where they rise out of the cup.
    """

    kind: str
    points: np.ndarray
    widths: np.ndarray
    opacity: np.ndarray


def _to_eye(a: Anatomy, x: float, y: float) -> np.ndarray:
    return np.array([(x - a.disc_center[0]) * a.temporal / a.fov_radius, -(y - a.disc_center[1]) / a.fov_radius])


@dataclass(frozen=True)
class _Frame:
    """Conversions between eye coordinates and the image."""

    anatomy: Anatomy
    fov: np.ndarray  # FOV centre in eye coordinates
    fovea: np.ndarray  # fovea in eye coordinates

    @classmethod
    def of(cls, anatomy: Anatomy) -> _Frame:
        return cls(anatomy, _to_eye(anatomy, *anatomy.fov_center), _to_eye(anatomy, *anatomy.fovea_center))

    def to_image(self, uv: np.ndarray) -> np.ndarray:
        a = self.anatomy
        x = a.disc_center[0] + a.temporal * uv[:, 0] * a.fov_radius
        y = a.disc_center[1] - uv[:, 1] * a.fov_radius
        return np.stack([x, y], axis=1)


def _wrap(angle: float) -> float:
    return (angle + math.pi) % (2 * math.pi) - math.pi


def grow_vessels(anatomy: Anatomy, rng: np.random.Generator) -> list[Vessel]:
    """Grow the whole tree for one eye; deterministic for a given generator state."""
    frame = _Frame.of(anatomy)
    (dx, dy), (ox, oy) = anatomy.disc_center, anatomy.cup_offset
    cup = _to_eye(anatomy, dx + ox, dy + oy)
    spread = 0.2 * anatomy.disc_radius / anatomy.fov_radius
    vessels: list[Vessel] = []
    deg = math.radians
    for up in (1.0, -1.0):
        # Temporal arcades arch about 2 disc diameters above and below the fovea; the inferior one
        # turns more slowly because the fovea lies below the disc.
        arcade_turn = 0.036 if up > 0 else 0.03
        small_nasal, small_macular = ("artery", "vein") if up > 0 else ("vein", "artery")
        trunks = [
            # kind, initial heading, target heading (degrees), turn rate, diameter (FOV radii), depth
            ("vein", up * rng.uniform(78, 86), -up * rng.uniform(14, 24), arcade_turn, 0.015, 0),
            ("artery", up * rng.uniform(66, 76), -up * rng.uniform(12, 22), arcade_turn, 0.0115, 0),
            ("vein", up * rng.uniform(98, 112), up * rng.uniform(138, 156), 0.04, 0.0105, 0),
            ("artery", up * rng.uniform(102, 118), up * rng.uniform(142, 160), 0.04, 0.0085, 0),
            (small_nasal, 180 - up * rng.uniform(5, 20), 180 - up * rng.uniform(0, 15), 0.02, 0.006, 1),
            (small_macular, up * rng.uniform(8, 25), up * rng.uniform(0, 10), 0.02, 0.005, 1),
        ]
        for kind, heading, target, turn, width, depth in trunks:
            start = cup + rng.uniform(-spread, spread, size=2)
            _walk(frame, rng, vessels, kind, start, deg(heading), deg(target), turn, width, depth)
    return vessels


def _walk(
    frame: _Frame,
    rng: np.random.Generator,
    out: list[Vessel],
    kind: str,
    start: np.ndarray,
    heading: float,
    target: float,
    turn: float,
    width: float,
    depth: int,
) -> None:
    """Walk one vessel from `start`, spawning branches, and append it (and its branches) to `out`."""
    points, widths = [start.copy()], [width]
    p, curl = start.copy(), 0.0
    wobble = 0.012 * (1 + depth)
    until_branch = _branch_gap(rng, depth)
    for _ in range(MAX_STEPS):
        # Correlated heading noise: gentle meanders rather than jitter.
        curl = 0.8 * curl + rng.normal(0.0, wobble)
        heading += turn * _wrap(target - heading) + curl
        p = p + STEP * np.array([math.cos(heading), math.sin(heading)])
        width *= TAPER
        points.append(p)
        widths.append(width)
        if np.hypot(*(p - frame.fov)) > 1.02 or np.hypot(*(p - frame.fovea)) < FAZ_RADIUS or width < MIN_WIDTH:
            break
        until_branch -= STEP
        if until_branch <= 0 and depth < MAX_DEPTH:
            side = rng.choice((-1.0, 1.0))
            child_heading = heading + side * math.radians(rng.uniform(25, 55))
            child_width = width * rng.uniform(0.45, 0.7)
            if child_width >= MIN_WIDTH:
                _walk(frame, rng, out, kind, p, child_heading, child_heading, 0.03, child_width, depth + 1)
            width *= 0.9
            until_branch = _branch_gap(rng, depth)
    a = frame.anatomy
    opacity = np.ones(len(points))
    if depth == 0:
        travelled = STEP * np.arange(len(points)) * a.fov_radius
        opacity = np.clip(0.3 + 0.7 * travelled / (0.6 * a.disc_radius), 0.3, 1.0)
    out.append(Vessel(kind, frame.to_image(np.array(points)), np.array(widths) * a.fov_radius, opacity))


def _branch_gap(rng: np.random.Generator, depth: int) -> float:
    """Distance walked before the next branch, in FOV radii; side branches branch less often."""
    return rng.uniform(0.16, 0.3) * (1 + 0.4 * depth)


def render_vessels(vessels: list[Vessel], grid: WorkGrid, fov_radius: float) -> tuple[np.ndarray, np.ndarray]:
    """Coverage maps (artery, vein), float32 (h, w) in 0-1, on the working grid.

    Each segment is a capsule whose radius varies linearly along it; the cross-section is a little
    lighter at the edges than on the axis, wide arteries carry a central light reflex, and thin
    vessels show less contrast than thick ones.
    """
    full_contrast = FULL_CONTRAST_WIDTH * fov_radius
    maps = {kind: np.zeros((grid.height, grid.width), np.float32) for kind in ("artery", "vein")}
    px = grid.pixel
    for vessel in vessels:
        target = maps[vessel.kind]
        pts, half, opacity = vessel.points, vessel.widths / 2.0, vessel.opacity
        for i in range(len(pts) - 1):
            (ax, ay), (bx, by) = pts[i], pts[i + 1]
            ha, hb = half[i], half[i + 1]
            pad = max(ha, hb) + 2 * px
            c0 = int(np.searchsorted(grid.xs, min(ax, bx) - pad))
            c1 = int(np.searchsorted(grid.xs, max(ax, bx) + pad, side="right"))
            r0 = int(np.searchsorted(grid.ys, min(ay, by) - pad))
            r1 = int(np.searchsorted(grid.ys, max(ay, by) + pad, side="right"))
            if c0 >= c1 or r0 >= r1:
                continue
            X = grid.xs[None, c0:c1]
            Y = grid.ys[r0:r1, None]
            ex, ey = bx - ax, by - ay
            t = np.clip(((X - ax) * ex + (Y - ay) * ey) / max(ex * ex + ey * ey, 1e-9), 0.0, 1.0)
            d = np.hypot(X - (ax + t * ex), Y - (ay + t * ey))
            hw = ha + t * (hb - ha)
            # Coverage of a line thinner than a pixel is its width in pixels, not a full pixel.
            cover = np.clip((hw - d) / px + 0.5, 0.0, 1.0) * min(1.0, 2.0 * max(ha, hb) / px)
            rel = np.minimum(d / hw, 1.0)
            contrast = min(1.0, max(MIN_CONTRAST, 2.0 * max(ha, hb) / full_contrast))
            fade = opacity[i] + t * (opacity[i + 1] - opacity[i])
            shade = cover * contrast * fade * (1.0 - 0.3 * rel * rel)
            if vessel.kind == "artery" and max(ha, hb) > 1.5 * px:
                shade *= 1.0 - 0.25 * np.exp(-((d / (0.22 * hw)) ** 2))
            np.maximum(target[r0:r1, c0:c1], shade, out=target[r0:r1, c0:c1])
    return maps["artery"], maps["vein"]
