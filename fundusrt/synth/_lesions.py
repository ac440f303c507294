"""Lesions: how many of each kind a case gets, where they go, and how each is drawn at full resolution.

Sizes are fractions of the FOV radius R (with a floor of about one pixel so that 512 px images still
show microaneurysms). Dark lesions multiply the background by a dark-red factor; bright lesions
blend towards their colour, dimmed with the local illumination so they sit naturally in the
vignetted rim. Every lesion lies wholly inside the field of view, off the optic disc, off the
large vessels (except neovascular tufts, which grow from veins) and clear of other lesions.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from fundusrt.synth._anatomy import Anatomy, WorkGrid
from fundusrt.synth._vessels import Vessel
from fundusrt.synth.grading import AMD_MIN_DRUSEN, SEVERE_HAEMORRHAGES, Lesion

# Drawn largest first so that big lesions find room before the small ones fill the gaps.
DRAW_ORDER = ("neovascularisation", "cotton_wool_spot", "haemorrhage", "hard_exudate", "drusen", "microaneurysm")
DARK_FACTOR = {
    "microaneurysm": (0.55, 0.3, 0.36),
    "haemorrhage": (0.5, 0.26, 0.3),
    "neovascularisation": (0.62, 0.34, 0.42),
}
BRIGHT_COLOUR = {
    "hard_exudate": (252, 238, 150),
    "cotton_wool_spot": (232, 224, 208),
    "drusen": (238, 205, 112),
}
VISIBLE_ALPHA = 0.1  # lesion boxes bound the pixels at least this opaque
MAX_TRIES = 300

AlphaFn = Callable[[np.ndarray, np.ndarray], np.ndarray]


def plan_lesions(dr_grade: int, amd: bool, rng: np.random.Generator) -> dict[str, int]:
    """Lesion counts whose grade (grading.dr_grade_from_lesions) is `dr_grade` and AMD flag is `amd`."""
    n = dict.fromkeys(DRAW_ORDER, 0)
    if dr_grade == 1:
        n["microaneurysm"] = int(rng.integers(1, 11))
    elif dr_grade == 2:
        n["microaneurysm"] = int(rng.integers(2, 16))
        n["haemorrhage"] = int(rng.integers(0, 13))
        n["hard_exudate"] = int(rng.integers(3, 16)) if rng.random() < 0.5 else 0
        n["cotton_wool_spot"] = int(rng.integers(1, 4)) if rng.random() < 0.3 else 0
        if n["haemorrhage"] + n["hard_exudate"] + n["cotton_wool_spot"] == 0:
            n["haemorrhage"] = 1
    elif dr_grade == 3:
        n["microaneurysm"] = int(rng.integers(8, 26))
        n["haemorrhage"] = int(rng.integers(SEVERE_HAEMORRHAGES, SEVERE_HAEMORRHAGES + 13))
        n["hard_exudate"] = int(rng.integers(0, 21))
        n["cotton_wool_spot"] = int(rng.integers(1, 7))
    elif dr_grade == 4:
        n["microaneurysm"] = int(rng.integers(5, 26))
        n["haemorrhage"] = int(rng.integers(3, 31))
        n["hard_exudate"] = int(rng.integers(0, 21))
        n["cotton_wool_spot"] = int(rng.integers(0, 6))
        n["neovascularisation"] = int(rng.integers(1, 3))
    if amd:
        n["drusen"] = int(rng.integers(AMD_MIN_DRUSEN + 2, 41))
    elif rng.random() < 0.3:
        # A few small drusen are common in healthy older eyes; they stay below the AMD threshold.
        n["drusen"] = int(rng.integers(1, AMD_MIN_DRUSEN - 3))
    return n


@dataclass
class _Scene:
    image: np.ndarray  # full-resolution uint8 (H, W, 3), drawn into
    anatomy: Anatomy
    grid: WorkGrid
    vessel_cover: np.ndarray  # working-grid max(artery, vein) coverage
    veins: list[Vessel]
    placed: list[tuple[float, float, float, float]]  # keep-out boxes of drawn lesions


def draw_lesions(
    image: np.ndarray,
    anatomy: Anatomy,
    grid: WorkGrid,
    vessel_cover: np.ndarray,
    vessels: list[Vessel],
    counts: dict[str, int],
    rng: np.random.Generator,
) -> list[Lesion]:
    """Place and draw `counts` lesions into `image` in place; return what was drawn.

    A lesion that finds no free spot after MAX_TRIES is left out, so the result is the truth about
    the image even then.
    """
    R = anatomy.fov_radius
    big_veins = [v for v in vessels if v.kind == "vein" and v.widths[0] >= 0.006 * R]
    scene = _Scene(image, anatomy, grid, vessel_cover, big_veins, [])
    lesions: list[Lesion] = []
    exudate_clusters = [_polar(rng, anatomy.fovea_center, 0.1 * R, 0.35 * R) for _ in range(int(rng.integers(1, 4)))]
    first_quadrant = int(rng.integers(4))
    for kind in DRAW_ORDER:
        for i in range(counts.get(kind, 0)):
            for _ in range(MAX_TRIES):
                center = _sample_center(kind, i, scene, rng, exudate_clusters, first_quadrant)
                lesion = _try_draw(kind, center, scene, rng)
                if lesion is not None:
                    lesions.append(lesion)
                    break
    return lesions


def _polar(rng: np.random.Generator, origin: tuple[float, float], r_min: float, r_max: float) -> tuple[float, float]:
    angle = rng.uniform(0, 2 * math.pi)
    r = math.sqrt(rng.uniform(r_min**2, r_max**2))
    return origin[0] + r * math.cos(angle), origin[1] + r * math.sin(angle)


def _sample_center(
    kind: str,
    index: int,
    scene: _Scene,
    rng: np.random.Generator,
    exudate_clusters: list[tuple[float, float]],
    first_quadrant: int,
) -> tuple[float, float]:
    a = scene.anatomy
    R = a.fov_radius
    if kind == "haemorrhage" or (kind == "microaneurysm" and rng.random() < 0.35):
        # Round-robin over the four quadrants around the FOV centre: severe cases reach all four.
        quadrant = (first_quadrant + index) % 4
        angle = rng.uniform(quadrant, quadrant + 1) * math.pi / 2
        r = math.sqrt(rng.uniform(0.1**2, 0.88**2)) * R
        return a.fov_center[0] + r * math.cos(angle), a.fov_center[1] + r * math.sin(angle)
    if kind == "microaneurysm":
        return _polar(rng, a.fovea_center, 0.05 * R, 0.45 * R)
    if kind == "hard_exudate":
        cx, cy = exudate_clusters[index % len(exudate_clusters)]
        return cx + rng.normal(0, 0.05 * R), cy + rng.normal(0, 0.05 * R)
    if kind == "drusen":
        return _polar(rng, a.fovea_center, 0.03 * R, 0.32 * R)
    if kind == "cotton_wool_spot":
        # Along the arcades: within the posterior pole, away from the centre of the macula.
        mid = ((a.disc_center[0] + a.fovea_center[0]) / 2, (a.disc_center[1] + a.fovea_center[1]) / 2)
        return _polar(rng, mid, 0.2 * R, 0.6 * R)
    # Neovascularisation elsewhere (NVE) grows from a vein, away from the disc.
    vein = scene.veins[int(rng.integers(len(scene.veins)))]
    reach = np.hypot(vein.points[:, 0] - a.disc_center[0], vein.points[:, 1] - a.disc_center[1])
    candidates = np.nonzero((reach > 0.3 * R) & (reach < 0.75 * R))[0]
    if candidates.size == 0:
        return _polar(rng, a.fov_center, 0.0, 0.8 * R)
    x, y = vein.points[int(rng.choice(candidates))]
    return float(x) + rng.normal(0, 0.02 * R), float(y) + rng.normal(0, 0.02 * R)


def _try_draw(kind: str, center: tuple[float, float], scene: _Scene, rng: np.random.Generator) -> Lesion | None:
    """Draw one lesion at `center` if the spot is allowed; None if it is not."""
    a = scene.anatomy
    cx, cy = center
    alpha_fn, extent = _SHAPES[kind](rng, a, center)
    if not _spot_allowed(kind, cx, cy, extent, scene):
        return None
    h, w = scene.image.shape[:2]
    x0, x1 = max(0, math.floor(cx - extent)), min(w, math.ceil(cx + extent) + 1)
    y0, y1 = max(0, math.floor(cy - extent)), min(h, math.ceil(cy + extent) + 1)
    dx = np.arange(x0, x1, dtype=np.float32)[None, :] - np.float32(cx)
    dy = np.arange(y0, y1, dtype=np.float32)[:, None] - np.float32(cy)
    alpha = alpha_fn(dx, dy).astype(np.float32)
    rows = np.nonzero((alpha >= VISIBLE_ALPHA).any(axis=1))[0]
    cols = np.nonzero((alpha >= VISIBLE_ALPHA).any(axis=0))[0]
    if rows.size == 0:
        return None
    patch = scene.image[y0:y1, x0:x1].astype(np.float32)
    if kind in DARK_FACTOR:
        patch *= 1.0 - alpha[..., None] * (1.0 - np.array(DARK_FACTOR[kind], np.float32))
    else:
        # Bright lesions are lit like the retina around them.
        light = np.clip(patch[..., 0].mean() / 200.0, 0.6, 1.1)
        colour = np.array(BRIGHT_COLOUR[kind], np.float32) * light
        patch += alpha[..., None] * (colour - patch)
    scene.image[y0:y1, x0:x1] = np.clip(np.rint(patch), 0, 255).astype(np.uint8)
    margin = max(3.0, 0.5 * extent)
    scene.placed.append((cx - extent - margin, cy - extent - margin, cx + extent + margin, cy + extent + margin))
    box = (x0 + int(cols[0]), y0 + int(rows[0]), x0 + int(cols[-1]) + 1, y0 + int(rows[-1]) + 1)
    # The reported centre is where the visible lesion is, not the spot it was aimed at.
    weight = np.where(alpha >= VISIBLE_ALPHA, alpha, 0.0)
    total = float(weight.sum())
    centroid = (
        x0 + float(weight.sum(axis=0) @ np.arange(x1 - x0)) / total,
        y0 + float(weight.sum(axis=1) @ np.arange(y1 - y0)) / total,
    )
    return Lesion(kind=kind, box=box, center=centroid)


def _spot_allowed(kind: str, cx: float, cy: float, extent: float, scene: _Scene) -> bool:
    a = scene.anatomy
    h, w = scene.image.shape[:2]
    if not (extent + 1 <= cx <= w - 2 - extent and extent + 1 <= cy <= h - 2 - extent):
        return False
    fx, fy = a.fov_center
    if math.hypot(abs(cx - fx) + extent, abs(cy - fy) + extent) > 0.96 * a.fov_radius:
        return False
    dx, dy = a.disc_center
    rd = a.disc_radius
    if math.hypot((cx - dx) / rd, (cy - dy) / (rd * a.disc_aspect)) < 1.3 + extent / rd:
        return False
    if kind != "neovascularisation":
        offsets = ((0.0, 0.0), (0.7, 0.0), (-0.7, 0.0), (0.0, 0.7), (0.0, -0.7))
        probes = [(cx + ox * extent, cy + oy * extent) for ox, oy in offsets]
        if max(float(scene.vessel_cover[scene.grid.index(x, y)]) for x, y in probes) > 0.15:
            return False
    margin = max(3.0, 0.5 * extent)
    bx0, by0, bx1, by1 = cx - extent - margin, cy - extent - margin, cx + extent + margin, cy + extent + margin
    return all(bx1 < px0 or px1 < bx0 or by1 < py0 or py1 < by0 for px0, py0, px1, py1 in scene.placed)


# Shapes: each takes (rng, anatomy, center) and returns (alpha(dx, dy), extent in pixels).


def _disc_alpha(radius: float, edge: float, peak: float) -> AlphaFn:
    return lambda dx, dy: peak * np.clip((radius - np.hypot(dx, dy)) / edge + 0.5, 0.0, 1.0)


def _ragged(
    rng: np.random.Generator, radius: float, harmonics: range, roughness: float
) -> Callable[[np.ndarray], np.ndarray]:
    """Radius as a function of angle: a circle perturbed by a few random harmonics."""
    amps = [rng.uniform(0, roughness) / k for k in harmonics]
    phases = [rng.uniform(0, 2 * math.pi) for _ in harmonics]
    return lambda theta: radius * (1.0 + sum(am * np.cos(k * theta + ph) for am, k, ph in zip(amps, harmonics, phases)))


def _microaneurysm(rng: np.random.Generator, a: Anatomy, center: tuple[float, float]) -> tuple[AlphaFn, float]:
    r = max(a.fov_radius * rng.uniform(0.0035, 0.0065), 1.1)
    return _disc_alpha(r, max(0.3 * r, 0.7), 0.95), r + 2.0


def _haemorrhage(rng: np.random.Generator, a: Anatomy, center: tuple[float, float]) -> tuple[AlphaFn, float]:
    R = a.fov_radius
    peak = rng.uniform(0.75, 0.95)
    style = rng.random()
    if style < 0.4:  # dot
        r = max(R * rng.uniform(0.008, 0.014), 1.5)
        return _disc_alpha(r, max(0.25 * r, 0.7), peak), r + 2.0
    if style < 0.8:  # blot: ragged outline, darker centre
        r = max(R * rng.uniform(0.014, 0.03), 2.0)
        outline = _ragged(rng, r, range(2, 6), 0.5)

        def blot(dx: np.ndarray, dy: np.ndarray) -> np.ndarray:
            d = np.hypot(dx, dy)
            edge = outline(np.arctan2(dy, dx))
            return peak * np.clip((edge - d) / (0.2 * r) + 0.5, 0.0, 1.0) * (1.0 - 0.15 * np.minimum(d / r, 1.0))

        return blot, 1.5 * r + 2.0
    # Flame: elongated along the nerve fibres, which run away from the disc.
    length = max(R * rng.uniform(0.02, 0.04), 2.0)
    thick = max(length * rng.uniform(0.25, 0.4), 1.0)
    theta = math.atan2(center[1] - a.disc_center[1], center[0] - a.disc_center[0])
    c, s = math.cos(theta), math.sin(theta)

    def flame(dx: np.ndarray, dy: np.ndarray) -> np.ndarray:
        along, across = dx * c + dy * s, -dx * s + dy * c
        rho = np.hypot(along / length, across / thick)
        return peak * np.clip((1.0 - rho) / 0.3 + 0.5, 0.0, 1.0)

    return flame, length + 2.0


def _hard_exudate(rng: np.random.Generator, a: Anatomy, center: tuple[float, float]) -> tuple[AlphaFn, float]:
    R = a.fov_radius
    spread = R * 0.008
    blobs = [
        (rng.normal(0, spread), rng.normal(0, spread), max(R * rng.uniform(0.003, 0.008), 1.0))
        for _ in range(int(rng.integers(1, 5)))
    ]

    def fleck(dx: np.ndarray, dy: np.ndarray) -> np.ndarray:
        out = np.zeros(np.broadcast_shapes(dx.shape, dy.shape), np.float32)
        for bx, by, r in blobs:
            np.maximum(out, np.clip((r - np.hypot(dx - bx, dy - by)) / max(0.35 * r, 0.6) + 0.5, 0.0, 1.0), out=out)
        return 0.92 * out

    return fleck, max(math.hypot(bx, by) + r for bx, by, r in blobs) + 2.0


def _cotton_wool_spot(rng: np.random.Generator, a: Anatomy, center: tuple[float, float]) -> tuple[AlphaFn, float]:
    r = max(a.fov_radius * rng.uniform(0.025, 0.05), 2.5)
    outline = _ragged(rng, r, range(2, 8), 0.6)
    squash = rng.uniform(0.6, 1.0)
    peak = rng.uniform(0.55, 0.8)
    # Mottling: a few plane waves about half the spot across, in random directions.
    waves = [
        (rng.uniform(0, 2 * math.pi), rng.uniform(0, 2 * math.pi), 2 * math.pi / (r * rng.uniform(0.4, 0.8)))
        for _ in range(3)
    ]

    def spot(dx: np.ndarray, dy: np.ndarray) -> np.ndarray:
        d = np.hypot(dx, dy / squash)
        t = np.clip(d / outline(np.arctan2(dy / squash, dx)), 0.0, 1.2)
        # Fluffy: a broad feathered margin and a mottled interior.
        body = 1.0 - np.clip((t - 0.4) / 0.6, 0.0, 1.0) ** 1.5
        mottle = sum(np.cos(k * (dx * math.cos(a) + dy * math.sin(a)) + ph) for a, ph, k in waves) / 3.0
        return peak * body * (0.85 + 0.15 * mottle)

    return spot, 1.6 * r + 2.0


def _drusen(rng: np.random.Generator, a: Anatomy, center: tuple[float, float]) -> tuple[AlphaFn, float]:
    r = max(a.fov_radius * rng.uniform(0.006, 0.018), 1.5)
    peak = rng.uniform(0.5, 0.75)
    return (lambda dx, dy: peak * np.clip(1.0 - (dx * dx + dy * dy) / (r * r), 0.0, 1.0) ** 0.6), r + 2.0


def _neovascularisation(rng: np.random.Generator, a: Anatomy, center: tuple[float, float]) -> tuple[AlphaFn, float]:
    R = a.fov_radius
    half = max(R * 0.0013, 0.6)
    step = R * 0.004
    segments = []
    for _ in range(int(rng.integers(3, 7))):
        p = np.zeros(2)
        heading = rng.uniform(0, 2 * math.pi)
        for _ in range(int(rng.integers(10, 19))):
            heading += rng.normal(0, 0.6)
            q = p + step * np.array([math.cos(heading), math.sin(heading)])
            segments.append((p, q))
            p = q
    reach = max(max(np.hypot(*p), np.hypot(*q)) for p, q in segments) + half

    def tuft(dx: np.ndarray, dy: np.ndarray) -> np.ndarray:
        d_min = np.full(np.broadcast_shapes(dx.shape, dy.shape), np.inf, np.float32)
        for p, q in segments:
            e = q - p
            t = np.clip(((dx - p[0]) * e[0] + (dy - p[1]) * e[1]) / float(e @ e), 0.0, 1.0)
            np.minimum(d_min, np.hypot(dx - (p[0] + t * e[0]), dy - (p[1] + t * e[1])), out=d_min)
        return 0.9 * np.clip((half - d_min) / 0.8 + 0.5, 0.0, 1.0)

    return tuft, reach + 2.0


_SHAPES: dict[str, Callable[[np.random.Generator, Anatomy, tuple[float, float]], tuple[AlphaFn, float]]] = {
    "microaneurysm": _microaneurysm,
    "haemorrhage": _haemorrhage,
    "hard_exudate": _hard_exudate,
    "cotton_wool_spot": _cotton_wool_spot,
    "drusen": _drusen,
    "neovascularisation": _neovascularisation,
}
