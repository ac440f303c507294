"""Where things are in a synthetic fundus, and the smooth background drawn at a working resolution.

Everything is sized in units of the field-of-view radius R so that a 512 px and a 4288x2848 image
of the same seed look alike. Smooth content (retina, macula, disc, vessels) is drawn on a working
grid whose FOV radius is at most WORK_RADIUS pixels and then resized to the full image; small
lesions are drawn later at full resolution.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

# FOV radius of the working grid in pixels: enough for smooth vessels, cheap at 4288x2848.
WORK_RADIUS = 560.0
# Wide sensors (4288x2848 and the like) crop the FOV circle at the top and bottom.
WIDE_ASPECT = 1.25


@dataclass(frozen=True)
class Anatomy:
    """Image-pixel geometry of one eye (x right, y down; pixel centres at integer coordinates).

    Attributes:
        width, height: image size.
        fov_center, fov_radius: circular field of view.
        temporal: +1 if temporal (towards the macula) is +x, -1 if it is -x. A right eye seen in a
            standard fundus photograph has its disc on the right and macula on the left, so -1.
        disc_center, disc_radius: optic disc centre and horizontal radius.
        disc_aspect: vertical / horizontal disc radius (discs are slightly vertically oval).
        cup_to_disc_ratio: vertical cup / vertical disc diameter.
        cup_offset: cup centre minus disc centre (cups sit a little temporal).
        fovea_center: the fovea, about 2.5 disc diameters temporal to the disc and a little lower.
    """

    width: int
    height: int
    fov_center: tuple[float, float]
    fov_radius: float
    temporal: int
    disc_center: tuple[float, float]
    disc_radius: float
    disc_aspect: float
    cup_to_disc_ratio: float
    cup_offset: tuple[float, float]
    fovea_center: tuple[float, float]


def fov_circle(width: int, height: int) -> tuple[tuple[float, float], float]:
    """Centre and radius of the camera's circular field of view for an image size."""
    short, long = min(width, height), max(width, height)
    if long / short >= WIDE_ASPECT:
        radius = min(0.63 * short, 0.45 * long)
    else:
        radius = 0.47 * short
    return ((width - 1) / 2.0, (height - 1) / 2.0), radius


def layout_anatomy(
    width: int, height: int, laterality: str, cup_to_disc_ratio: float, rng: np.random.Generator
) -> Anatomy:
    """Place disc, cup and fovea for one eye, with small per-case variation."""
    (cx, cy), R = fov_circle(width, height)
    temporal = -1 if laterality == "R" else 1
    disc_radius = R * rng.uniform(0.115, 0.14)
    # Fields range from macula-centred to disc-and-macula-centred; disc-fovea distance ~2.5 DD.
    fovea_offset = R * rng.uniform(0.12, 0.3)
    disc_fovea = 5.0 * disc_radius * rng.uniform(0.92, 1.08)
    fovea_x = cx + temporal * fovea_offset
    fovea_y = cy + R * rng.uniform(-0.05, 0.05)
    # The fovea lies 6-9 degrees below the disc centre.
    drop = math.radians(rng.uniform(5.0, 9.0))
    disc_x = fovea_x - temporal * disc_fovea * math.cos(drop)
    disc_y = fovea_y - disc_fovea * math.sin(drop)
    return Anatomy(
        width=width,
        height=height,
        fov_center=(cx, cy),
        fov_radius=R,
        temporal=temporal,
        disc_center=(disc_x, disc_y),
        disc_radius=disc_radius,
        disc_aspect=rng.uniform(1.04, 1.12),
        cup_to_disc_ratio=cup_to_disc_ratio,
        cup_offset=(temporal * disc_radius * rng.uniform(0.03, 0.12), disc_radius * rng.uniform(-0.05, 0.05)),
        fovea_center=(fovea_x, fovea_y),
    )


@dataclass(frozen=True)
class WorkGrid:
    """The working-resolution raster: its size and each row/column's full-image coordinate."""

    width: int
    height: int
    xs: np.ndarray  # (width,) full-image x of each working column centre
    ys: np.ndarray  # (height,) full-image y of each working row centre
    pixel: float  # full-image pixels per working pixel

    @classmethod
    def for_anatomy(cls, anatomy: Anatomy) -> WorkGrid:
        scale = min(1.0, WORK_RADIUS / anatomy.fov_radius)
        w = max(1, round(anatomy.width * scale))
        h = max(1, round(anatomy.height * scale))
        sx, sy = w / anatomy.width, h / anatomy.height
        # Pixel-centre mapping used by PIL's resize, so that upscaling lands things where computed.
        xs = ((np.arange(w, dtype=np.float32) + 0.5) / sx - 0.5).astype(np.float32)
        ys = ((np.arange(h, dtype=np.float32) + 0.5) / sy - 0.5).astype(np.float32)
        return cls(width=w, height=h, xs=xs, ys=ys, pixel=1.0 / sx)

    def index(self, x: float, y: float) -> tuple[int, int]:
        """Working (row, col) nearest to a full-image point, clamped to the raster."""
        col = round((x + 0.5) / self.pixel - 0.5)
        row = round((y + 0.5) / self.pixel - 0.5)
        return min(max(row, 0), self.height - 1), min(max(col, 0), self.width - 1)


def smooth_noise(rng: np.random.Generator, grid: WorkGrid, cell: float) -> np.ndarray:
    """Zero-mean, unit-ish amplitude noise with features about `cell` full-image pixels across."""
    gh = max(2, math.ceil(grid.height * grid.pixel / cell) + 2)
    gw = max(2, math.ceil(grid.width * grid.pixel / cell) + 2)
    coarse = rng.standard_normal((gh, gw)).astype(np.float32)
    field = Image.fromarray(coarse, mode="F").resize((grid.width, grid.height), Image.Resampling.BICUBIC)
    return np.asarray(field, dtype=np.float32)


def _smoothstep(edge0: float, edge1: float, x: np.ndarray) -> np.ndarray:
    t = np.clip((x - edge0) / (edge1 - edge0), 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def render_retina(anatomy: Anatomy, grid: WorkGrid, rng: np.random.Generator) -> np.ndarray:
    """Retina with illumination falloff, texture, macula and optic disc; float32 (h, w, 3) in 0-255."""
    R = anatomy.fov_radius
    X, Y = grid.xs[None, :], grid.ys[:, None]
    pigment = rng.uniform(0.82, 1.05)
    base = np.array([rng.uniform(205, 235), rng.uniform(82, 112), rng.uniform(30, 55)], np.float32) * pigment

    # Illumination: brightest near a slightly off-centre point, falling off to the rim.
    lx = anatomy.fov_center[0] + rng.normal(0, 0.08) * R
    ly = anatomy.fov_center[1] + rng.normal(0, 0.08) * R
    r2 = ((X - lx) ** 2 + (Y - ly) ** 2) / (R * R)
    illumination = np.clip(1.0 - rng.uniform(0.35, 0.5) * r2 ** rng.uniform(1.0, 1.5), 0.2, 1.0)

    brightness = illumination * (1.0 + 0.05 * smooth_noise(rng, grid, 0.35 * R))
    brightness += 0.02 * smooth_noise(rng, grid, 0.08 * R)
    # Choroidal colour varies a little: redder or more orange patches.
    chroma = 0.04 * smooth_noise(rng, grid, 0.25 * R)

    fx, fy = anatomy.fovea_center
    df2 = ((X - fx) ** 2 + (Y - fy) ** 2) / (R * R)
    macula = 1.0 - rng.uniform(0.18, 0.3) * np.exp(-df2 / (2 * 0.13**2)) - 0.15 * np.exp(-df2 / (2 * 0.03**2))

    img = np.empty((grid.height, grid.width, 3), np.float32)
    img[..., 0] = base[0] * brightness * macula
    img[..., 1] = base[1] * brightness * macula * (1.0 + chroma) * (0.97 + 0.03 * macula)
    img[..., 2] = base[2] * brightness * macula * (1.0 + 0.5 * chroma)
    if rng.random() < 0.7:
        # Young eyes show a tiny foveal light reflex.
        reflex = np.exp(-df2 / (2 * 0.006**2))
        img += (0.35 * reflex)[..., None] * (np.array([255, 230, 200], np.float32) - img)
    _draw_disc(img, anatomy, grid, rng)
    return img


def _draw_disc(img: np.ndarray, anatomy: Anatomy, grid: WorkGrid, rng: np.random.Generator) -> None:
    """Optic disc (pale orange-pink rim, soft margin, peripapillary glow) and its paler cup, in place."""
    dx0, dy0 = anatomy.disc_center
    rd, asp = anatomy.disc_radius, anatomy.disc_aspect
    reach = 2.2 * rd * asp
    cols = np.nonzero(np.abs(grid.xs - dx0) <= reach)[0]
    rows = np.nonzero(np.abs(grid.ys - dy0) <= reach)[0]
    if cols.size == 0 or rows.size == 0:
        return
    c0, c1, r0, r1 = cols[0], cols[-1] + 1, rows[0], rows[-1] + 1
    X = grid.xs[None, c0:c1] - dx0
    Y = grid.ys[r0:r1, None] - dy0
    patch = img[r0:r1, c0:c1]

    rho = np.sqrt((X / rd) ** 2 + (Y / (rd * asp)) ** 2)
    glow = 0.12 * np.exp(-np.maximum(rho - 1.0, 0.0) ** 2 / (2 * 0.2**2))
    patch += glow[..., None] * (np.array([240, 160, 100], np.float32) - patch)

    # The temporal rim is paler than the nasal rim.
    pallor = 0.5 + 0.5 * np.clip(anatomy.temporal * X / rd, -1.0, 1.0)
    rim = np.array([232, 138, 88], np.float32) + pallor[..., None] * np.array([15, 40, 30], np.float32)
    disc_alpha = (1.0 - _smoothstep(0.93, 1.05, rho)) * rng.uniform(0.8, 0.9)
    patch += disc_alpha[..., None] * (rim - patch)

    cdr = anatomy.cup_to_disc_ratio
    ox, oy = anatomy.cup_offset
    rho_cup = np.sqrt(((X - ox) / (rd * cdr)) ** 2 + ((Y - oy) / (rd * asp * cdr)) ** 2)
    cup_alpha = (1.0 - _smoothstep(0.87, 1.07, rho_cup)) * 0.85
    patch += cup_alpha[..., None] * (np.array([252, 236, 196], np.float32) - patch)
