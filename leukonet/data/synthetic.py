"""Deterministic synthetic May-Grünwald-Giemsa leukocyte crops.

Real smear datasets (e.g. PBC) are large downloads with their own licences. This
generator lets the training job and the tests run offline, anywhere, on images
laid out like the real ones: one stained leukocyte centred among red cells, the
five classes told apart by their morphology and stain.

Images are composed in optical density (Beer-Lambert), so overlapping red cells
and granules over a nucleus darken the way stains do, at twice the output size
and downsampled for anti-aliasing.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from leukonet.classes import CLASSES

# Bump when the images change, so stale datasets are refused rather than mixed.
_VERSION = 1


def _od(rgb: tuple[int, int, int]) -> np.ndarray:
    """Optical density of a stain that shows as `rgb` on white."""
    return -np.log(np.asarray(rgb, dtype=np.float64) / 255.0)


_BACKGROUND = _od((242, 230, 231))
_RED_CELL = _od((228, 160, 160))
_NUCLEUS = _od((92, 40, 130))
_MONOCYTE_NUCLEUS = _od((118, 72, 156))
_CYTOPLASM = {
    "basophil": _od((214, 184, 222)),
    "eosinophil": _od((242, 196, 170)),
    "lymphocyte": _od((160, 198, 236)),
    "monocyte": _od((188, 190, 216)),
    "neutrophil": _od((232, 206, 226)),
}
_GRANULE = {
    "basophil": _od((50, 20, 92)),
    "eosinophil": _od((222, 104, 62)),
    "neutrophil": _od((200, 150, 200)),
}
# Mean cell radius as a fraction of the image side (red cells: about 0.11).
_RADIUS = {"basophil": 0.21, "eosinophil": 0.26, "lymphocyte": 0.165, "monocyte": 0.31, "neutrophil": 0.25}

Layers = list[tuple[np.ndarray, np.ndarray]]  # (density map, optical density of the stain)


@dataclass(frozen=True)
class _Cell:
    """Where one leukocyte sits on the canvas; local units are its radius, rotated by `angle`."""

    n: int
    cx: float
    cy: float
    r: float
    angle: float

    def px(self, u: np.ndarray | float, v: np.ndarray | float) -> np.ndarray:
        """Canvas pixel coordinates (x, y) of local points, rounded to int32."""
        c, s = math.cos(self.angle), math.sin(self.angle)
        x = self.cx + self.r * (np.asarray(u) * c - np.asarray(v) * s)
        y = self.cy + self.r * (np.asarray(u) * s + np.asarray(v) * c)
        return np.rint(np.stack([x, y], axis=-1)).astype(np.int32)

    def blank(self) -> np.ndarray:
        return np.zeros((self.n, self.n), np.uint8)

    def ellipse(
        self, mask: np.ndarray, u: float, v: float, a: float, b: float, tilt: float, value: int = 255
    ) -> None:
        """Fill an ellipse with semi-axes a, b (local units) tilted by `tilt` radians."""
        axes = (max(1, round(a * self.r)), max(1, round(b * self.r)))
        centre = tuple(int(c) for c in self.px(u, v))
        cv2.ellipse(mask, centre, axes, math.degrees(self.angle + tilt), 0, 360, value, -1, cv2.LINE_AA)

    def arc(self, mask: np.ndarray, u: float, a: float, b: float, gap: float, width: float) -> None:
        """Draw a thick elliptical arc centred at (u, 0), open by `gap` radians towards +u."""
        axes, centre = (round(a * self.r), round(b * self.r)), tuple(int(c) for c in self.px(u, 0.0))
        half = math.degrees(gap) / 2
        thickness = round(width * self.r)
        cv2.ellipse(mask, centre, axes, math.degrees(self.angle), half, 360 - half, 255, thickness, cv2.LINE_AA)

    def line(self, mask: np.ndarray, p: np.ndarray, q: np.ndarray, width: float) -> None:
        a, b = (tuple(int(c) for c in self.px(*pt)) for pt in (p, q))
        cv2.line(mask, a, b, 255, max(1, round(width * self.r)), cv2.LINE_AA)


def _soft(mask: np.ndarray, sigma: float) -> np.ndarray:
    """A uint8 mask blurred into a float alpha in [0, 1]."""
    return cv2.GaussianBlur(mask, (0, 0), sigma).astype(np.float64) / 255.0


def _noise(rng: np.random.Generator, n: int, cells: int) -> np.ndarray:
    """Smooth random field of roughly [0, 1] with about `cells` blobs across."""
    return cv2.resize(rng.random((cells, cells)), (n, n), interpolation=cv2.INTER_CUBIC)


def _grain(rng: np.random.Generator, n: int, body: np.ndarray, strength: float) -> np.ndarray:
    """Fine cytoplasmic granularity, the same at every image size."""
    speckle = cv2.GaussianBlur(rng.random((128, 128)), (0, 0), 1.0)
    speckle = cv2.resize(speckle, (n, n), interpolation=cv2.INTER_LINEAR)
    return _soft(body, 1.0) * np.clip((speckle - 0.5) * 8.0, 0.0, 1.0) * strength


def _smoothstep(lo: float, hi: float, x: np.ndarray) -> np.ndarray:
    t = np.clip((x - lo) / (hi - lo), 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def _red_cells(rng: np.random.Generator, n: int, cell: _Cell) -> np.ndarray:
    """Density of pale biconcave red cells scattered around (and partly under) the leukocyte."""
    density = np.zeros((n, n))
    for _ in range(int(rng.integers(7, 13))):
        r = rng.uniform(0.10, 0.125) * n
        for _attempt in range(20):
            x, y = rng.uniform(-0.3 * r, n + 0.3 * r, 2)
            if math.hypot(x - cell.cx, y - cell.cy) > 0.8 * cell.r + 0.5 * r:
                break
        squash, tilt = rng.uniform(0.85, 1.0), rng.uniform(0, math.pi)
        x0, x1 = max(0, int(x - r) - 2), min(n, int(x + r) + 3)
        y0, y1 = max(0, int(y - r) - 2), min(n, int(y + r) + 3)
        if x0 >= x1 or y0 >= y1:
            continue
        dy, dx = np.arange(y0, y1)[:, None] - y, np.arange(x0, x1)[None, :] - x
        u = (dx * math.cos(tilt) + dy * math.sin(tilt)) / r
        v = (dy * math.cos(tilt) - dx * math.sin(tilt)) / (r * squash)
        rho = np.sqrt(u * u + v * v)
        edge = np.clip((1.0 - rho) * r / 1.5, 0.0, 1.0)
        pallor = rng.uniform(0.3, 0.55)
        profile = pallor + (1.0 - pallor) * _smoothstep(0.15, 0.8, rho)
        density[y0:y1, x0:x1] += edge * profile * rng.uniform(0.85, 1.1)
    return density


def _outline(cell: _Cell, rng: np.random.Generator, wobble: float) -> np.ndarray:
    """Mask of a roughly round cell body with a gently irregular edge."""
    theta = np.linspace(0, 2 * math.pi, 72, endpoint=False)
    rho = np.ones_like(theta)
    for k in range(2, 6):
        rho += rng.normal(0, wobble / k) * np.cos(k * theta + rng.uniform(0, 2 * math.pi))
    mask = cell.blank()
    cv2.fillPoly(mask, [cell.px(rho * np.cos(theta), rho * np.sin(theta))], 255, cv2.LINE_AA)
    return mask


def _granules(
    cell: _Cell, rng: np.random.Generator, inside: np.ndarray, count: int, size: tuple[float, float]
) -> np.ndarray:
    """Mask of `count` round granules of radius in `size` (local units), where `inside` is set."""
    rho, phi = np.sqrt(rng.random(count)) * 1.1, rng.uniform(0, 2 * math.pi, count)
    points = np.clip(cell.px(rho * np.cos(phi), rho * np.sin(phi)), 0, cell.n - 1)
    radii = np.maximum(1, np.rint(rng.uniform(*size, count) * cell.r)).astype(int)
    shades = rng.integers(170, 256, count)
    keep = inside[points[:, 1], points[:, 0]] > 127
    mask = cell.blank()
    for (x, y), radius, shade in zip(points[keep], radii[keep], shades[keep]):
        cv2.circle(mask, (int(x), int(y)), int(radius), int(shade), -1, cv2.LINE_AA)
    return mask


def _lobes(rng: np.random.Generator, count: int, step: float, turn: tuple[float, float]) -> np.ndarray:
    """Centres of `count` nuclear lobes along a curled chain, centred and kept inside the cell."""
    points, heading, bend = [np.zeros(2)], 0.0, rng.choice([-1.0, 1.0])
    for _ in range(count - 1):
        if rng.random() < 0.3:
            bend = -bend  # an S- rather than C-shaped chain
        heading += bend * rng.uniform(*turn)
        points.append(points[-1] + step * np.array([math.cos(heading), math.sin(heading)]))
    chain = np.array(points) - np.mean(points, axis=0)
    reach = np.max(np.linalg.norm(chain, axis=1))
    return chain * min(1.0, 0.55 / reach) if reach > 0 else chain


def _segmented(cell: _Cell, rng: np.random.Generator, count: int, big: bool) -> np.ndarray:
    """Nucleus mask of `count` lobes joined by chromatin strands."""
    if big:
        chain = _lobes(rng, count, rng.uniform(0.7, 0.8), (0.1, 0.5))
    else:
        chain = _lobes(rng, count, rng.uniform(0.55, 0.68), (0.6, 1.3))
    mask = cell.blank()
    for p, q in zip(chain[:-1], chain[1:]):
        cell.line(mask, p, q, rng.uniform(0.06, 0.14))
    for i, (u, v) in enumerate(chain):
        d = chain[min(i + 1, count - 1)] - chain[max(i - 1, 0)]
        low, high = ((0.3, 0.26), (0.37, 0.31)) if big else ((0.3, 0.22), (0.38, 0.28))
        a, b = rng.uniform(low, high)
        cell.ellipse(mask, u, v, a, b, math.atan2(d[1], d[0]) + rng.normal(0, 0.4))
    return mask


def _chromatin(rng: np.random.Generator, n: int, coarse: int, depth: float) -> np.ndarray:
    """Clumpy chromatin density around 1."""
    return 1.0 - depth / 2 + depth * (0.6 * _noise(rng, n, coarse) + 0.4 * _noise(rng, n, 3 * coarse))


def _neutrophil(cell: _Cell, rng: np.random.Generator, body: np.ndarray) -> tuple[np.ndarray, Layers]:
    if rng.random() < 0.15:  # band form: one curved, unsegmented rod
        lobes = cell.blank()
        a, b, gap, width = rng.uniform((0.45, 0.38, 1.4, 0.2), (0.55, 0.46, 2.4, 0.28))
        cell.arc(lobes, -0.05, a, b, gap, width)
    else:
        lobes = _segmented(cell, rng, int(rng.choice([3, 4, 5], p=[0.35, 0.45, 0.2])), big=False)
    nucleus = _soft(lobes, 0.004 * cell.n)
    granules = _grain(rng, cell.n, body, 0.3)
    return nucleus, [
        (nucleus * _chromatin(rng, cell.n, 14, 0.4), _NUCLEUS),
        (granules, _GRANULE["neutrophil"]),
    ]


def _eosinophil(cell: _Cell, rng: np.random.Generator, body: np.ndarray) -> tuple[np.ndarray, Layers]:
    lobes = _segmented(cell, rng, 2 if rng.random() < 0.85 else 3, big=True)
    size = rng.uniform(0.05, 0.065)
    # Granules pack the cytoplasm and only here and there lie over the lobes.
    free = np.where((lobes > 127) & (rng.random(lobes.shape) < 0.9), 0, body)
    granules = _granules(cell, rng, free, int(rng.uniform(1.4, 1.8) / size**2), (0.8 * size, 1.2 * size))
    nucleus = _soft(lobes, 0.004 * cell.n)
    return nucleus, [
        (nucleus * _chromatin(rng, cell.n, 14, 0.4) * 0.9, _NUCLEUS),
        (_soft(granules, 0.003 * cell.n) * 0.9, _GRANULE["eosinophil"]),
    ]


def _basophil(cell: _Cell, rng: np.random.Generator, body: np.ndarray) -> tuple[np.ndarray, Layers]:
    lobes = cell.blank()
    for _ in range(int(rng.integers(1, 3))):
        u, v = rng.normal(0, 0.12, 2)
        cell.ellipse(lobes, u, v, rng.uniform(0.4, 0.55), rng.uniform(0.3, 0.45), rng.uniform(0, math.pi))
    size = rng.uniform(0.07, 0.095)
    granules = _granules(cell, rng, body, int(rng.uniform(0.8, 1.1) / size**2), (0.6 * size, 1.4 * size))
    nucleus = _soft(lobes, 0.006 * cell.n)
    return nucleus, [
        (nucleus * 0.75, _NUCLEUS),
        (_soft(granules, 0.004 * cell.n) * rng.uniform(0.8, 1.0), _GRANULE["basophil"]),
    ]


def _lymphocyte(cell: _Cell, rng: np.random.Generator, body: np.ndarray) -> tuple[np.ndarray, Layers]:
    lobes = cell.blank()
    u, v = rng.normal(0, 0.06, 2)
    cell.ellipse(lobes, u, v, rng.uniform(0.68, 0.88), rng.uniform(0.64, 0.8), rng.uniform(0, math.pi))
    if rng.random() < 0.3:  # a small indentation
        cell.ellipse(lobes, u + 0.8, v, 0.18, 0.18, 0.0, value=0)
    nucleus = _soft(np.minimum(lobes, body), 0.004 * cell.n)
    return nucleus, [(nucleus * _chromatin(rng, cell.n, 12, 0.35) * 1.1, _NUCLEUS)]


def _monocyte(cell: _Cell, rng: np.random.Generator, body: np.ndarray) -> tuple[np.ndarray, Layers]:
    lobes, shape = cell.blank(), rng.random()
    if shape < 0.4:  # kidney: an oval with a notch
        cell.ellipse(lobes, -0.1, 0.0, rng.uniform(0.62, 0.72), rng.uniform(0.48, 0.56), rng.normal(0, 0.2))
        cell.ellipse(lobes, 0.58, 0.0, rng.uniform(0.24, 0.32), rng.uniform(0.2, 0.28), 0.0, value=0)
    elif shape < 0.75:  # horseshoe: a thick arc
        a, b, gap, width = rng.uniform((0.48, 0.4, 1.6, 0.34), (0.56, 0.48, 2.6, 0.42))
        cell.arc(lobes, -0.08, a, b, gap, width)
    else:  # folded: two overlapping oval lobes
        for side in (-1, 1):
            tilt = side * rng.uniform(0.3, 0.8)
            a, b = rng.uniform((0.44, 0.32), (0.52, 0.4))
            cell.ellipse(lobes, 0.22 * side, 0.05 * side, a, b, tilt)
    nucleus = _soft(lobes, 0.004 * cell.n)
    lace = 1.0 - np.abs(2.0 * _noise(rng, cell.n, 22) - 1.0)
    layers = [
        (nucleus * (0.6 + 0.5 * lace**2), _MONOCYTE_NUCLEUS),
        (_grain(rng, cell.n, body, 0.12), _GRANULE["neutrophil"]),  # faint "ground glass"
    ]
    if rng.random() < 0.5:
        vacuoles = _granules(cell, rng, np.where(lobes > 0, 0, body), int(rng.integers(3, 10)), (0.07, 0.14))
        layers.append((-0.6 * _soft(vacuoles, 0.01 * cell.n), _CYTOPLASM["monocyte"]))
    return nucleus, layers


# Each draws one class's nucleus and granules; returns the nucleus alpha and the stain layers.
_MORPHOLOGY: dict[str, Callable[[_Cell, np.random.Generator, np.ndarray], tuple[np.ndarray, Layers]]] = {
    "basophil": _basophil,
    "eosinophil": _eosinophil,
    "lymphocyte": _lymphocyte,
    "monocyte": _monocyte,
    "neutrophil": _neutrophil,
}


def _stain(rng: np.random.Generator) -> np.ndarray:
    """Random 3x3 map of optical densities: stain intensity, channel balance, hue and saturation."""
    theta = rng.normal(0.0, math.radians(5.0))
    k = np.full(3, 1 / math.sqrt(3))
    cross = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    hue = math.cos(theta) * np.eye(3) + math.sin(theta) * cross + (1 - math.cos(theta)) * np.outer(k, k)
    grey = np.full((3, 3), 1 / 3)
    saturation = grey + rng.uniform(0.85, 1.15) * (np.eye(3) - grey)
    balance = np.diag(np.exp(rng.normal(0.0, 0.04, 3)))
    return rng.uniform(0.85, 1.15) * balance @ saturation @ hue


def render_cell(label: str, rng: np.random.Generator, size: int = 128) -> np.ndarray:
    """One RGB uint8 image (size, size, 3) of a leukocyte of class `label`."""
    if label not in _MORPHOLOGY:
        raise ValueError(f"unknown class {label!r}; expected one of {CLASSES}")
    n = 2 * size
    jitter = np.clip(rng.normal(0.0, 0.025 * n, 2), -0.06 * n, 0.06 * n)
    radius = _RADIUS[label] * n * rng.uniform(0.9, 1.1)
    cell = _Cell(n, n / 2 + jitter[0], n / 2 + jitter[1], radius, rng.uniform(0, 2 * math.pi))

    body = _outline(cell, rng, 0.08 if label == "monocyte" else 0.04)
    alpha = _soft(body, 0.006 * n)
    nucleus, layers = _MORPHOLOGY[label](cell, rng, body)
    layers += [
        (0.85 + 0.3 * _noise(rng, n, 4), _BACKGROUND),
        (_red_cells(rng, n, cell) * (1.0 - alpha), _RED_CELL),
        (alpha * (1.0 - nucleus) * rng.uniform(0.85, 1.15), _CYTOPLASM[label]),
    ]
    densities, stains = zip(*layers)
    mix = np.stack(stains) @ _stain(rng).T
    # Plane by plane: much faster than a (threaded, machine-dependent) BLAS product here.
    od = np.empty((n, n, 3))
    for c in range(3):
        plane = densities[0] * mix[0, c]
        for density, weight in zip(densities[1:], mix[1:, c]):
            plane += density * weight
        od[..., c] = np.maximum(plane, 0.0)

    od = cv2.resize(od, (size, size), interpolation=cv2.INTER_AREA)
    rgb = np.exp(-od) * (255.0 * rng.uniform(0.96, 1.03))
    rgb = cv2.GaussianBlur(rgb, (0, 0), rng.uniform(0.3, 0.8) * size / 128)
    rgb += rng.normal(0.0, rng.uniform(1.0, 3.0), rgb.shape)
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


def generate_dataset(root: str | Path, n_per_class: int = 100, size: int = 128, seed: int = 0) -> Path:
    """Write root/<class>/<class>_<i:04d>.png for each class; return Path(root).

    Idempotent: a root whose `.complete` marker matches the arguments is returned as is.
    Any other existing root (unless empty) is refused, never overwritten. Images go to a
    temporary sibling directory that is renamed to root only once complete.
    """
    root = Path(root)
    if n_per_class < 1 or size < 16:
        raise ValueError(f"need n_per_class >= 1 and size >= 16, got {n_per_class} and {size}")
    params = {"n_per_class": int(n_per_class), "seed": int(seed), "size": int(size), "version": _VERSION}
    if _is_complete(root, params):
        return root
    if (root.exists() or root.is_symlink()) and not (root.is_dir() and not any(root.iterdir())):
        raise ValueError(
            f"{root} exists but is not a complete synthetic dataset for {params} "
            "(different parameters, or an interrupted run); delete it or choose another root"
        )
    root.parent.mkdir(parents=True, exist_ok=True)
    staging = root.parent / f".{root.name}.{uuid.uuid4().hex[:12]}.partial"
    staging.mkdir()
    try:
        for index, label in enumerate(CLASSES):
            (staging / label).mkdir()
            for i in range(n_per_class):
                image = render_cell(label, np.random.default_rng([seed, index, i]), size)
                ok, png = cv2.imencode(".png", cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
                if not ok:
                    raise OSError(f"could not encode {label}_{i:04d}.png")
                (staging / label / f"{label}_{i:04d}.png").write_bytes(png.tobytes())
        (staging / ".complete").write_text(json.dumps(params, sort_keys=True))
        if root.is_dir():
            root.rmdir()  # empty, as checked above; rmdir refuses if anything appeared since
        os.replace(staging, root)
    except OSError:
        if not _is_complete(root, params):  # fine only if a concurrent run just finished the same set
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return root


def _is_complete(root: Path, params: dict[str, int]) -> bool:
    try:
        return json.loads((root / ".complete").read_text()) == params
    except (OSError, ValueError):
        return False
