"""Find the leukocytes in a whole microscope field and crop each one like a training image.

The classifier learns from single-cell crops (PBC: one leukocyte centred in a 360 px CellaVision
image), but users photograph whole fields: a few leukocytes among hundreds of red cells, at a
magnification of their own. Fed whole, such a field is nothing like a training image. This module
finds each leukocyte and crops it centred, at the scale at which it fills the same fraction of the
crop as leukocytes do in the training crops.

Classical image processing is enough and needs no labels: in a May-Grünwald-Giemsa smear the
leukocyte nucleus is the only large object stained dark violet. In optical density (OD) it absorbs
green light strongly and blue light hardly at all, whereas the eosin-type stain of red cells and
eosinophil granules absorbs blue about as much as green, and background and most cytoplasm absorb
little of either. ``OD_green - OD_blue`` is therefore a one-line colour deconvolution into a nuclear
stain channel (PBC nuclei ~1.8, BCCD ~0.7, red cells ~0.1). It is thresholded at half the image's own
nucleus level (labs stain differently: see ``nucleus_threshold``); each piece of nucleus
proposes the largest disc of stained cell (nucleus, cytoplasm, granules: anything darker than the
background) centred in its middle; pieces whose discs overlap are the lobes of one cell; groups too
small to be a nucleus (platelets, debris) are dropped; a cell cut by the field's edge is kept, marked
``cut``, when as much nucleus shows as a whole small nucleus has (in BCCD's fields 110 of 372
leukocytes touch the edge: a finder that drops them misses them in the count). The cell's
centre and radius are those of the largest disc of stained cell centred in the middle of its
nucleus: a red cell touching the leukocyte widens the stained region but hardly that disc. For an
irregular cell (a monocyte with pseudopods) the disc is smaller than the cell; the training
fraction is measured with the same disc, so the two agree.

Sizes (blur, openings, the smallest nucleus) are relative to a unit measured with the red cells as
a ruler: a red cell is ~7.5 µm in every smear, so the unit follows the image's magnification and
camera (``size_unit``: RED_CELL_UNIT typical red-cell widths, which at the usual 100x oil
magnification is about the field's shorter side, what the thresholds were set on). A field showing
2-3x more area, its cells 2-3x smaller in pixels, is searched at their size. An image with too few
whole red cells to measure (a tight crop round the leukocyte) falls back to its shorter side. Scaling
every cell to the same fraction of its crop also removes what absolute size says about the class (a
small lymphocyte, a large monocyte).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from leukonet.classes import CLASSES
from leukonet.data import synthetic as syn
from leukonet.data.folder import load_rgb, scan_folder
from leukonet.errors import DataError

# Median share of the crop width spanned by the cell's diameter (2 * Cell.radius as find_cells measures
# it) in the PBC training crops: the cell spans about 35 % of the crop (5-95 %: 0.25-0.45). Measured with
# cell_fraction on all 2,500 readable images of ../shared/data/pbc-2500 (a cell was found in every one; 0.35556
# before the per-image nucleus threshold and the red-cell ruler), from the repository root:
#   .venv/bin/python -c "from leukonet.data.cells import cell_fraction; from leukonet.data.folder import
#   load_rgb, scan_folder; root = '../shared/data/pbc-2500'; print(cell_fraction(load_rgb(f'{root}/{e.path}')
#   for e in scan_folder(root).entries if not e.path.rsplit('/', 1)[-1].startswith('.')))"  # -> 0.34617
TRAINING_FRACTION = 0.346

NUCLEUS_SHARE = 0.35  # a pixel is nucleus above this share of the image's nucleus level (see nucleus_threshold)
NUCLEUS_FLOOR = 0.3  # ... and never below this OD_green - OD_blue, which red cells stay under
MIN_NUCLEUS = 0.06  # a nucleus smaller than a disc of this radius (share of the size unit) is a platelet or debris

# The size unit in red-cell widths (red_cell_width), set so that at the usual magnification it is the shorter side
# the sizes were first set on: that side spans 5.5 red-cell widths in BCCD's fields (median of 364, 5-95 %: 4.8-6.2)
# and 5.2 in PBC's crops (every 5th: 500, 4.6-6.2).
RED_CELL_UNIT = 5.4
PEAK_WINDOW = 15  # px: one distance-transform peak per red cell (they are ~30 px wide even in 3x3 BCCD mosaics)
MIN_RED_CELL = 1 / 30  # narrower than this share of the shorter side: a platelet or speck (1/16 in 3x3 BCCD mosaics)
MIN_RED_CELLS = 3  # with fewer whole red cells (at least half as wide as the typical one), the unit is the shorter side


@dataclass
class Cell:
    """A leukocyte in a field: centre and approximate cell radius (nucleus and cytoplasm), in pixels."""

    x: float
    y: float
    radius: float
    cut: bool = False  # the nucleus touches the field's edge: part of the cell is outside the image


def _optical_density(field: np.ndarray) -> np.ndarray:
    """Per-channel optical density relative to the field's own white (its 99th percentile)."""
    rgb = field.astype(np.float32) + 1.0
    white = np.percentile(rgb.reshape(-1, 3), 99, axis=0)
    return np.maximum(np.log(white / rgb), 0.0)


def _stained(total: np.ndarray) -> float:
    """Summed optical density above which a pixel belongs to some cell rather than to the background.

    Halfway between the background's level and Otsu's threshold (background against stained
    cells): Otsu's own cut lies at red-cell density and would leave out pale cytoplasm.
    """
    top = float(np.percentile(total, 99.5)) if total.size else 0.0
    if top <= 0:
        return math.inf
    scaled = np.clip(total * (255 / top), 0, 255).astype(np.uint8)
    otsu, _ = cv2.threshold(scaled, 0, 255, cv2.THRESH_BINARY | cv2.THRESH_OTSU)
    background = np.median(scaled[scaled <= otsu])
    return (background + otsu) / 2 * top / 255


def _filled(mask: np.ndarray) -> np.ndarray:
    """A uint8 mask with the holes in its regions filled."""
    contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    out = np.zeros_like(mask)
    cv2.drawContours(out, contours, -1, 1, cv2.FILLED)
    return out


def _disc(radius: float) -> np.ndarray:
    """A disc-shaped structuring element of the given radius (at least 1 px)."""
    side = 2 * max(1, round(radius)) + 1
    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (side, side))


def find_cells(field: np.ndarray) -> list[Cell]:
    """The leukocytes in an RGB uint8 field, in no particular order; those cut by the field's edge have ``cut``."""
    if field.ndim != 3 or field.shape[2] != 3 or field.dtype != np.uint8:
        raise ValueError(f"expected an RGB uint8 image (H, W, 3), got {field.dtype} {field.shape}")
    od = _optical_density(field)
    scale = size_unit(od)
    od = cv2.GaussianBlur(od, (0, 0), max(1.0, scale / 300))
    stain = od[..., 1] - od[..., 2]
    nucleus = (stain > nucleus_threshold(stain)).astype(np.uint8)
    nucleus = cv2.morphologyEx(nucleus, cv2.MORPH_OPEN, _disc(scale / 200))
    total = od.sum(axis=2)
    body = _filled(((total > _stained(total[nucleus == 0])) | (nucleus > 0)).astype(np.uint8))
    body = cv2.morphologyEx(body, cv2.MORPH_OPEN, _disc(scale / 100))
    # beyond the field's edge counts as background, so a cell cut by the edge gets its centre inside the field
    distance = cv2.distanceTransform(np.pad(body, 1), cv2.DIST_L2, 5)[1:-1, 1:-1]

    # Each piece of nucleus proposes the largest disc of stained cell around it. The lobes of one
    # cell propose overlapping discs (all reach the cell's middle); two cells touching each other, or
    # a leukocyte and a red cell, only touch at their rims, which the shrunken discs do not.
    count, pieces, stats, _ = cv2.connectedComponentsWithStats(nucleus)
    left, top, width, height, area = stats.T
    at_edge = (left == 0) | (top == 0) | (left + width == field.shape[1]) | (top + height == field.shape[0])
    min_area = math.pi * (MIN_NUCLEUS * scale) ** 2
    discs = np.zeros_like(nucleus)
    seeds = []
    proposing = area >= min_area / 10
    proposing[0] = False  # the background
    for label in np.flatnonzero(proposing):
        x, y, radius = _inscribed(distance, pieces == label)
        cv2.circle(discs, (x, y), round(0.8 * radius), 1, cv2.FILLED)
        seeds.append((label, x, y))
    _, groups = cv2.connectedComponents(discs)
    cell_of_piece = np.zeros(count, np.int32)
    for label, x, y in seeds:
        cell_of_piece[label] = groups[y, x]
    cells = []
    for group in np.unique(cell_of_piece[cell_of_piece > 0]):
        members = cell_of_piece[pieces] == group
        if members.sum() >= min_area:  # a cell cut by the edge too: as much nucleus as a whole small one shows
            x, y, radius = _inscribed(distance, members)
            cells.append(Cell(float(x), float(y), float(radius), bool(at_edge[cell_of_piece == group].any())))
    return cells


def size_unit(od: np.ndarray) -> float:
    """The length, in pixels, to which find_cells' sizes are relative: RED_CELL_UNIT red-cell widths.

    Red cells measure ~7.5 µm in every smear, so they tell the image's scale whatever its magnification
    and camera, down to about 5x less magnification than the usual (see MIN_RED_CELL). Where the image
    holds fewer than MIN_RED_CELLS whole red cells (a tight crop, a blank image), its shorter side
    stands in, which is about the unit at the usual magnification.
    """
    side = float(min(od.shape[:2]))
    width = red_cell_width(od)
    return side if width is None else RED_CELL_UNIT * width


def red_cell_width(od: np.ndarray) -> float | None:
    """Typical width in pixels of the red cells in an optical-density image, or None when it holds too few.

    The distance transform of the stained region (leukocyte nuclei cut out, the image's edge counted as
    background) peaks in the middle of each red cell at its radius, also where red cells touch or
    overlap in clumps: the width is that of the largest disc inside a cell (in BCCD's crowded fields
    0.8 of the diameter its boxes give, in synthetic fields 0.95). Peaks whose disc reaches a nucleus
    (leukocyte cytoplasm) or the edge (a cut red cell), and peaks narrower than MIN_RED_CELL of the
    shorter side (platelets, specks), are left out; of the rest, the median weighted by the disc's area
    is little moved by ragged edges or by a stray large blob (a clump, unevenly lit background).
    """
    od = cv2.GaussianBlur(od, (0, 0), 1.0)
    stain = od[..., 1] - od[..., 2]
    nucleus = (stain > nucleus_threshold(stain)).astype(np.uint8)
    nucleus = cv2.morphologyEx(nucleus, cv2.MORPH_OPEN, _disc(2)) > 0  # not the coloured rims of some red cells
    total = od[..., 0] + od[..., 1] + od[..., 2]
    stained = _filled((total > _stained(total[~nucleus])).astype(np.uint8))
    stained[nucleus] = 0
    distance = cv2.distanceTransform(np.pad(stained, 1), cv2.DIST_L2, 5)[1:-1, 1:-1]  # a cut red cell is not wider
    to_edge = cv2.distanceTransform(np.pad(np.ones_like(stained), 1), cv2.DIST_L2, 5)[1:-1, 1:-1]
    to_nucleus = cv2.distanceTransform((~nucleus).astype(np.uint8), cv2.DIST_L2, 5) if nucleus.any() else math.inf
    peak = distance >= cv2.dilate(distance, np.ones((PEAK_WINDOW, PEAK_WINDOW), np.uint8))
    peak &= distance >= MIN_RED_CELL * min(stained.shape) / 2
    peak &= (to_nucleus > 1.5 * distance) & (distance < to_edge)  # not a leukocyte's cytoplasm, not a cut red cell
    count, peaks = cv2.connectedComponents(peak.astype(np.uint8))
    radii = np.zeros(count, np.float32)
    np.maximum.at(radii, peaks[peak], distance[peak])
    radii = np.sort(radii[1:])
    if radii.size == 0:
        return None
    weight = np.cumsum(radii**2)
    width = 2 * float(radii[np.searchsorted(weight, weight[-1] / 2)])
    return width if np.count_nonzero(radii >= width / 4) >= MIN_RED_CELLS else None


def nucleus_threshold(stain: np.ndarray) -> float:
    """Nuclear stain (``OD_green - OD_blue``) above which a pixel is nucleus, set by the image's own stain.

    Half the image's nucleus level (its 99.9th percentile: the darkest nuclei, wherever a leukocyte
    fills 0.1 % of the image), as a full width at half maximum: PBC's nuclei reach ~2.0, BCCD's only
    ~0.6-1.1, and a fixed cut either splits pale nuclei or swallows dark cytoplasm. Never below
    NUCLEUS_FLOOR, which red cells stay under (in BCCD fields, 99 % of the pixels outside leukocyte and
    platelet boxes are below 0.15-0.35), so an image without a nucleus does not get one from its red cells.
    """
    level = float(np.percentile(stain, 99.9)) if stain.size else 0.0
    return max(NUCLEUS_FLOOR, NUCLEUS_SHARE * level)


def _inscribed(distance: np.ndarray, mask: np.ndarray) -> tuple[int, int, float]:
    """Centre and radius of the largest disc of stained cell centred in the middle of `mask`'s convex hull.

    The middle: points at least 0.7 times as deep inside the hull as its deepest point. Keeping the
    centre there stops a red cell or smudge that touches the leukocyte from drawing the disc off it.
    """
    hull = np.zeros(mask.shape, np.uint8)
    cv2.fillConvexPoly(hull, cv2.convexHull(cv2.findNonZero(mask.astype(np.uint8))), 1)
    depth = cv2.distanceTransform(hull, cv2.DIST_L2, 3)
    inner = (depth >= 0.7 * depth.max()).astype(np.uint8)
    _, radius, _, (x, y) = cv2.minMaxLoc(distance, mask=inner)
    return x, y, radius


def main_cell(field: np.ndarray, cells: Sequence[Cell]) -> Cell | None:
    """The cell a single-cell image is about: the most central of those at least half the largest's size."""
    if not cells:
        return None
    h, w = field.shape[:2]
    big = [c for c in cells if c.radius >= 0.5 * max(c.radius for c in cells)]
    return min(big, key=lambda c: math.hypot(c.x - w / 2, c.y - h / 2))


# A single-cell crop, as opposed to a field (see single_cell), measured with find_cells on pbc-2500, bccd-crops,
# cellavision-100 and bccd-fields (experiments/new_lab): the most central large cell lies within 0.15 (PBC), 0.32
# (BCCD crops) and 0.20 (cellavision) of the shorter side of the centre, and its diameter spans at least 0.21,
# 0.33 and 0.19 of that side (1st percentile); in BCCD's whole fields the nearest cell lies 0.29 away (median).
CROP_OFFSET = 0.33  # the main cell's centre within this share of the shorter side of the image's centre
CROP_MIN_DIAMETER = 0.18  # ... and its diameter at least this share of the shorter side
NEIGHBOUR = 1.5  # another whole cell farther than this many radii (both cells') apart makes the image a field


def single_cell(image: np.ndarray, cells: Sequence[Cell]) -> Cell | None:
    """The cell a single-cell crop shows, or None when ``image`` is a field (or shows no cell).

    A crop is framed on one cell: its main cell (``main_cell``) lies near the centre and is large, and any
    other cell is either cut by the crop's edge or next to the main one (a neighbour caught in the frame, or
    lobes of the main cell the finder split). A field holds cells anywhere: a second whole cell well apart
    from the first makes it one, and so does a small or off-centre first.
    """
    main = main_cell(image, cells)
    if main is None:
        return None
    h, w = image.shape[:2]
    side = min(h, w)
    if math.hypot(main.x - w / 2, main.y - h / 2) > CROP_OFFSET * side or 2 * main.radius < CROP_MIN_DIAMETER * side:
        return None
    apart = [c for c in cells if c is not main and not c.cut and c.radius >= 0.6 * main.radius
             and math.hypot(c.x - main.x, c.y - main.y) > NEIGHBOUR * (c.radius + main.radius)]
    return None if apart else main


def cell_fraction(images: Iterable[np.ndarray]) -> float:
    """Median share of the crop width taken by the main cell's diameter in single-cell crops."""
    fractions = []
    for image in images:
        cell = main_cell(image, find_cells(image))
        if cell is not None:
            fractions.append(2 * cell.radius / image.shape[1])
    if not fractions:
        raise DataError("cell_fraction: no leukocyte found in any of the images")
    return float(np.median(fractions))


def crop_cell(field: np.ndarray, cell: Cell, fraction: float, out_size: int = 360) -> np.ndarray:
    """A square crop centred on `cell`, 2 * radius / fraction wide, resized to out_size; reflected at borders."""
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    side = max(2, round(2 * cell.radius / fraction))
    x0, y0 = round(cell.x - side / 2), round(cell.y - side / 2)
    h, w = field.shape[:2]
    pad = ((max(0, -y0), max(0, y0 + side - h)), (max(0, -x0), max(0, x0 + side - w)), (0, 0))
    padded = np.pad(field, pad, mode="reflect")
    top, left = y0 + pad[0][0], x0 + pad[1][0]
    crop = padded[top : top + side, left : left + side]
    interpolation = cv2.INTER_AREA if side > out_size else cv2.INTER_LINEAR
    return cv2.resize(crop, (out_size, out_size), interpolation=interpolation)


def prepare_fields(
    source: str | Path, crops_out: str | Path, fraction: float = TRAINING_FRACTION
) -> tuple[list[dict], dict[str, int]]:
    """Crop the leukocyte out of each field of a class-per-folder tree (one leukocyte a field, as in LISC).

    Writes ``crops_out/<class>/<stem>.png`` (360 px) of each field's main cell (see `main_cell`) and
    returns the manifest rows ``{path, label, source}`` (absolute paths, class names) and how many
    fields were left out, by reason: unreadable image, no leukocyte found, duplicate file name.
    """
    source, crops_out = Path(source), Path(crops_out)
    rows: list[dict] = []
    left_out: Counter[str] = Counter()
    written: set[Path] = set()
    for entry in scan_folder(source).entries:
        path = source / entry.path
        label = CLASSES[entry.label]
        out = crops_out / label / f"{path.stem}.png"
        if out in written:
            left_out["duplicate file name"] += 1
            continue
        try:
            field = load_rgb(path)
        except ValueError:
            left_out["unreadable image"] += 1
            continue
        cell = main_cell(field, find_cells(field))
        if cell is None:
            left_out["no leukocyte found"] += 1
            continue
        ok, png = cv2.imencode(".png", cv2.cvtColor(crop_cell(field, cell, fraction), cv2.COLOR_RGB2BGR))
        if not ok:
            raise OSError(f"could not encode a crop of {path}")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(png.tobytes())
        written.add(out)
        rows.append({"path": str(out.resolve()), "label": label, "source": str(path.resolve())})
    return rows, dict(left_out)


FIELD_CROP = 0.7  # synthetic fields: cells sized as in a synthetic crop this share of the field's shorter side wide


def synthetic_field(
    rng: np.random.Generator,
    size: tuple[int, int] = (480, 640),
    n_cells: int = 2,
    labels: Sequence[str] | None = None,
) -> tuple[np.ndarray, list[Cell]]:
    """An RGB field (height, width) of red cells and `n_cells` non-overlapping leukocytes, and where they are.

    Drawn like `leukonet.data.synthetic.render_cell` (same stains, morphologies and red cells, composed in
    optical density at twice the size), with the proportions of a synthetic crop FIELD_CROP of the shorter
    side wide. `labels`: the leukocytes' classes, random if None. Returned radii are the drawn cell bodies'.
    """
    labels = [str(c) for c in rng.choice(CLASSES, n_cells)] if labels is None else list(labels)
    if len(labels) != n_cells or not set(labels) <= set(CLASSES):
        raise ValueError(f"need {n_cells} labels from {CLASSES}, got {labels}")
    h, w = 2 * size[0], 2 * size[1]
    n = 2 * round(FIELD_CROP * min(size))  # side of one crop's canvas, at the drawing scale
    mix = syn._stain(rng)
    od = np.zeros((h, w, 3))
    red = np.zeros((h, w))
    alpha = np.zeros((h, w))
    background = syn._noise(rng, max(h, w), max(4, round(4 * max(h, w) / n)))[:h, :w]
    _paste(od, (0.85 + 0.3 * background)[..., None] * (syn._BACKGROUND @ mix.T), 0, 0)
    for offset in (0, -n // 2):  # two staggered grids of tiles cover each other's seams
        for top in range(offset, h, n):
            for left in range(offset, w, n):
                _paste(red, _red_cell_tile(rng, n), top, left)

    cells: list[Cell] = []
    for label in labels:
        radius = syn._RADIUS[label] * n * rng.uniform(0.9, 1.1)
        reach = 1.15 * radius  # the outline's wobble stays within this
        for _attempt in range(200):
            x, y = rng.uniform(reach, w - reach), rng.uniform(reach, h - reach)
            if all(math.hypot(x - (2 * c.x + 0.5), y - (2 * c.y + 0.5)) > reach + 2.3 * c.radius for c in cells):
                break
        else:
            raise ValueError(f"cannot fit {n_cells} leukocytes apart in a {size[0]}x{size[1]} field")
        top, left = int(y) - n // 2, int(x) - n // 2
        cell = syn._Cell(n, x - left, y - top, radius, rng.uniform(0, 2 * math.pi))
        body = syn._outline(cell, rng, 0.08 if label == "monocyte" else 0.04)
        cell_alpha = syn._soft(body, 0.006 * n)
        nucleus, layers = syn._MORPHOLOGY[label](cell, rng, body)
        layers.append((cell_alpha * (1.0 - nucleus) * rng.uniform(0.85, 1.15), syn._CYTOPLASM[label]))
        for density, stain in layers:
            _paste(od, density[..., None] * (stain @ mix.T), top, left)
        _paste(alpha, cell_alpha, top, left)
        cells.append(Cell((x - 0.5) / 2, (y - 0.5) / 2, radius / 2))  # drawing pixels -> field pixels
    _paste(od, (red * (1.0 - np.minimum(alpha, 1.0)))[..., None] * (syn._RED_CELL @ mix.T), 0, 0)

    od = cv2.resize(np.maximum(od, 0.0), (size[1], size[0]), interpolation=cv2.INTER_AREA)
    rgb = np.exp(-od) * (255.0 * rng.uniform(0.96, 1.03))
    rgb = cv2.GaussianBlur(rgb, (0, 0), rng.uniform(0.3, 0.8) * n / 256)
    rgb += rng.normal(0.0, rng.uniform(1.0, 3.0), rgb.shape)
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8), cells


def _red_cell_tile(rng: np.random.Generator, n: int) -> np.ndarray:
    """Density of the red cells of an n x n synthetic crop, less those its edge cuts."""
    density = syn._red_cells(rng, n, syn._Cell(n, -n, -n, 0.0, 0.0))  # a leukocyte out of the way
    _, blobs, stats, _ = cv2.connectedComponentsWithStats((density > 0.01).astype(np.uint8))
    left, top, width, height, _ = stats.T
    cut = (left == 0) | (top == 0) | (left + width == n) | (top + height == n)
    return density * ~cut[blobs]


def _paste(target: np.ndarray, patch: np.ndarray, top: int, left: int) -> None:
    """Add `patch` into `target` with its corner at (top, left), clipped to `target`."""
    t, l = max(top, 0), max(left, 0)
    b, r = min(top + patch.shape[0], target.shape[0]), min(left + patch.shape[1], target.shape[1])
    if b > t and r > l:
        target[t:b, l:r] += patch[t - top : b - top, l - left : r - left]
