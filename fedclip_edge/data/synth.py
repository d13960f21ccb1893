"""A deterministic synthetic stand-in for PACS that needs no download.

Eight simple shape classes drawn in four styles that differ the way PACS's domains do
(photo, art painting, cartoon, sketch). Classes are told apart by outline only: every colour is
drawn independently of the class, so a model cannot shortcut through colour. Each image is
seeded from (seed, domain, class, index) alone, so any single image can be rebuilt on its own
and a written dataset is byte-identical across runs.
"""

from __future__ import annotations

import colorsys
import functools
import math
import os
import random
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageChops, ImageDraw, ImageFilter

from fedclip_edge.data.shapes import SHAPES, Poly
from fedclip_edge.data.shapes import place as _place
from fedclip_edge.errors import ConfigError
from fedclip_edge.io import make_out_dir
from fedclip_edge.names import unknown_name

DOMAINS: tuple[str, ...] = ("photo", "art_painting", "cartoon", "sketch")
# Sorted, so a class's index here equals its label from scan_dataset (sorted folder names).
CLASSES: tuple[str, ...] = (
    "circle",
    "cross",
    "heart",
    "house",
    "moon",
    "square",
    "star",
    "triangle",
)

# Supersampling factor: draw at 2x and box-filter down, which anti-aliases cheaply.
_SS = 2
_MIN_SIZE = 16
# Side of the coarse grid on which smooth fields (gradients, lighting) are computed.
_COARSE = 32
_HALF = [v // 2 for v in range(256)]  # point() table: halve a mask's strength

# Named hues (degrees); the name is what a caption may mention.
_HUES: tuple[tuple[str, float], ...] = (
    ("red", 0.0),
    ("orange", 28.0),
    ("yellow", 55.0),
    ("green", 120.0),
    ("teal", 175.0),
    ("blue", 220.0),
    ("purple", 275.0),
    ("pink", 325.0),
)


# ----------------------------------------------------------------------------- helpers


def _px(canvas: int, width: int) -> int:
    """A line width tuned on the 128-pixel canvas (64-pixel images), scaled to this one."""
    return max(1, round(width * canvas / 128))


def _hsv(h_deg: float, s: float, v: float) -> np.ndarray:
    rgb = colorsys.hsv_to_rgb((h_deg % 360.0) / 360.0, float(s), float(v))
    return np.array(rgb, dtype=np.float32) * np.float32(255.0)


def _pick_hue(rng: np.random.Generator) -> tuple[str, float]:
    name, hue = _HUES[int(rng.integers(len(_HUES)))]
    return name, hue + rng.uniform(-8.0, 8.0)


def _far_hue(rng: np.random.Generator, avoid: float, min_gap: float = 70.0) -> float:
    """A hue at least `min_gap` degrees from `avoid`, so the object stands out."""
    return avoid + min_gap + rng.uniform(0.0, 360.0 - 2 * min_gap)


def _mask(polys: list[Poly], size: int) -> Image.Image:
    m = Image.new("L", (size, size), 0)
    d = ImageDraw.Draw(m)
    for p in polys:
        d.polygon([tuple(q) for q in p.tolist()], fill=255)
    return m


def _closed(p: Poly) -> list[tuple[float, float]]:
    pts = [tuple(q) for q in p.tolist()]
    return pts + pts[:2]  # one extra point so the last joint is drawn rounded too


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Low-frequency noise in [0, 1]: a few random cells upsampled bicubically."""
    small = Image.fromarray((rng.random((cells, cells)) * 255).astype(np.uint8), "L")
    return np.asarray(small.resize((size, size), Image.BICUBIC), dtype=np.float32) / 255.0


@functools.lru_cache(maxsize=8)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel x and y coordinates (read-only, cached: every style needs them)."""
    ax = np.arange(size, dtype=np.float32)
    xs, ys = ax[None, :].repeat(size, 0), ax[:, None].repeat(size, 1)
    xs.flags.writeable = ys.flags.writeable = False
    return xs, ys


def _to_image(arr: np.ndarray) -> Image.Image:
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")


def _resample(p: Poly, step: float) -> Poly:
    """Points every ~`step` pixels along the closed outline, so jitter makes a wobbly line."""
    closed = np.concatenate([p, p[:1]])
    seg = np.diff(closed, axis=0)
    lens = np.hypot(seg[:, 0], seg[:, 1])
    cum = np.concatenate([[0.0], np.cumsum(lens)])
    n = max(8, int(cum[-1] / step))
    t = np.linspace(0.0, cum[-1], n, endpoint=False)
    return np.stack([np.interp(t, cum, closed[:, 0]), np.interp(t, cum, closed[:, 1])], axis=1)


# ----------------------------------------------------------------------------- styles


def _field(arr: np.ndarray, s: int) -> Image.Image:
    """A smooth colour field computed on a coarse grid, upsampled in C (much cheaper)."""
    return _to_image(arr).resize((s, s), Image.BILINEAR)


def _photo(rng: np.random.Generator, polys, details, centre, radius, s: int):
    g = _COARSE
    xs, ys = _grid(g)
    k = s / g  # canvas pixels per coarse cell
    # Background: a sky gradient over a textured ground, both in random natural-ish colours.
    top = _hsv(rng.uniform(0, 360), rng.uniform(0.1, 0.5), rng.uniform(0.55, 0.95))
    bottom = _hsv(rng.uniform(0, 360), rng.uniform(0.15, 0.6), rng.uniform(0.3, 0.8))
    ang = rng.uniform(0, 2 * math.pi)
    t = xs * math.cos(ang) + ys * math.sin(ang)
    t = ((t - t.min()) / max(float(t.max() - t.min()), 1e-6))[..., None]
    light = 0.8 + 0.4 * _smooth_noise(rng, g, 5)[..., None]
    bg = _field((top * (1 - t) + bottom * t) * light, s)
    if rng.random() < 0.6:
        horizon = int(s * rng.uniform(0.55, 0.85))
        ground = _hsv(rng.uniform(20, 140), rng.uniform(0.2, 0.6), rng.uniform(0.25, 0.6))
        tex = _smooth_noise(rng, s, 16)[..., None]
        ground_img = _to_image(ground * (0.75 + 0.5 * tex))
        bg.paste(ground_img.crop((0, horizon, s, s)), (0, horizon))
    # Soft drop shadow darkens the background.
    mask = _mask(polys, s)
    dx, dy = (rng.uniform(-0.06, 0.06) * s, rng.uniform(0.02, 0.07) * s)
    shadow = ImageChops.offset(mask, int(dx), int(dy)).filter(ImageFilter.BoxBlur(s * 0.03))
    bg = ImageChops.multiply(bg, ImageChops.invert(shadow.point(_HALF)).convert("RGB"))
    # Object: a lit, shaded surface with a specular highlight.
    name, hue = _pick_hue(rng)
    base = _hsv(hue, rng.uniform(0.45, 0.9), rng.uniform(0.55, 0.95))
    la = rng.uniform(0, 2 * math.pi)
    lx, ly = math.cos(la), math.sin(la)
    cx, cy, r = centre[0] / k, centre[1] / k, radius / k
    shade = np.clip(1.0 - 0.35 * ((xs - cx) * lx + (ys - cy) * ly) / r, 0.4, 1.4)[..., None]
    hx, hy = cx - lx * r * 0.45, cy - ly * r * 0.45
    spec = np.exp(-((xs - hx) ** 2 + (ys - hy) ** 2) / (2 * (r * 0.25) ** 2))[..., None]
    obj = _field(base * shade + 90.0 * rng.uniform(0.3, 1.0) * spec, s)
    if details:
        ImageDraw.Draw(obj).polygon(
            [tuple(q) for q in details[0].tolist()], fill=tuple(int(v * 0.55) for v in base)
        )
    img = Image.composite(obj, bg, mask.filter(ImageFilter.BoxBlur(0.6)))
    # Sensor noise, one value per pixel (luminance).
    noise = rng.standard_normal((s, s, 1), dtype=np.float32) * rng.uniform(2.0, 7.0)
    return _to_image(np.asarray(img, dtype=np.float32) + noise), name


def _sketch(rng: np.random.Generator, polys, details, centre, radius, s: int):
    ink = Image.new("L", (s, s), 0)
    draw = ImageDraw.Draw(ink)
    passes = int(rng.integers(2, 4))
    width = _px(s, int(rng.integers(1, 4)))
    outlines = [_resample(p, step=s * 0.045) for p in polys + details]
    for _ in range(passes):
        strength = int(rng.integers(140, 256))
        shift = rng.normal(0.0, s * 0.008, size=2)
        for base in outlines:
            pts = base + shift + rng.normal(0.0, s * 0.006, size=base.shape)
            # Pencil lifts: break the closed outline into a few open strokes, slightly
            # overlapping, like a hand re-drawing a contour.
            n = len(pts)
            cuts = np.sort(rng.choice(n, size=min(n, int(rng.integers(1, 4))), replace=False))
            ring = np.concatenate([pts, pts]).tolist()
            ends = cuts[1:].tolist() + [int(cuts[0]) + n]
            overshoot = rng.integers(0, 3, size=len(cuts)).tolist()
            for a, b, o in zip(cuts.tolist(), ends, overshoot, strict=True):
                seg = [tuple(q) for q in ring[a : b + o]]
                if len(seg) >= 2:
                    draw.line(seg, fill=strength, width=width, joint="curve")
    if rng.random() < 0.6:
        # Hatching inside the shape, clipped to it.
        hatch = Image.new("L", (s, s), 0)
        hd = ImageDraw.Draw(hatch)
        ang = rng.uniform(0, math.pi)
        gap = s * rng.uniform(0.04, 0.07)
        dx, dy = math.cos(ang), math.sin(ang)
        cx, cy = centre
        h_strength = int(rng.integers(70, 150))
        reach = radius * 1.3
        for k in range(-int(radius / gap) - 1, int(radius / gap) + 2):
            ox, oy = cx - dy * k * gap, cy + dx * k * gap
            hd.line(
                [(ox - dx * reach, oy - dy * reach), (ox + dx * reach, oy + dy * reach)],
                fill=h_strength,
                width=_px(s, 1),
            )
        ink = ImageChops.lighter(ink, ImageChops.multiply(hatch, _mask(polys, s)))
    ink = ink.filter(ImageFilter.BoxBlur(0.5))
    # Grey paper with grain, darkened towards the pencil's lead value where there is ink.
    paper = rng.uniform(228, 252)
    lead = rng.uniform(20, 90)
    a = np.asarray(ink, dtype=np.float32) * np.float32(1.0 / 255.0)
    grain = rng.standard_normal((s, s), dtype=np.float32) * 4.0
    grey = Image.fromarray(np.clip((paper + grain) * (1 - a) + lead * a, 0, 255).astype(np.uint8))
    tint = (255, int(255 * rng.uniform(0.97, 1.0)), int(255 * rng.uniform(0.92, 0.99)))
    return ImageChops.multiply(grey.convert("RGB"), Image.new("RGB", (s, s), tint)), "pencil"


def _cartoon(rng: np.random.Generator, polys, details, centre, radius, s: int):
    bg_hue = rng.uniform(0, 360)
    bg = tuple(int(v) for v in _hsv(bg_hue, rng.uniform(0.15, 0.55), rng.uniform(0.92, 1.0)))
    img = Image.new("RGB", (s, s), bg)
    draw = ImageDraw.Draw(img)
    name, hue = _pick_hue(rng)
    if abs((hue - bg_hue + 180) % 360 - 180) < 50:  # keep fill and background apart
        bg_hue = _far_hue(rng, hue)
        bg = tuple(int(v) for v in _hsv(bg_hue, rng.uniform(0.15, 0.55), rng.uniform(0.92, 1.0)))
        img.paste(bg, (0, 0, s, s))
    fill = tuple(int(v) for v in _hsv(hue, rng.uniform(0.75, 1.0), rng.uniform(0.85, 1.0)))
    line = tuple(int(v) for v in rng.integers(0, 35, size=3))
    width = _px(s, int(rng.integers(5, 10)))
    for p in polys:
        draw.polygon([tuple(q) for q in p.tolist()], fill=fill)
    if rng.random() < 0.6:
        # A flat white highlight blob, clipped inside the shape.
        cx, cy = centre
        hr = radius * rng.uniform(0.12, 0.2)
        hx, hy = cx - radius * 0.35, cy - radius * 0.35
        spot = Image.new("L", (s, s), 0)
        ImageDraw.Draw(spot).ellipse([hx - hr, hy - hr * 0.7, hx + hr, hy + hr * 0.7], fill=255)
        inside = _mask(polys, s)  # eroded by erasing a band wider than the outline
        erase = ImageDraw.Draw(inside)
        for p in polys:
            erase.line(_closed(p), fill=0, width=width + _px(s, 6), joint="curve")
        img.paste((255, 255, 255), (0, 0), ImageChops.multiply(spot, inside))
    dark = tuple(int(v * 0.6) for v in fill)
    for p in details:
        draw.polygon([tuple(q) for q in p.tolist()], fill=dark)
    for p in polys + details:
        draw.line(_closed(p), fill=line, width=width, joint="curve")
    return img, name


@functools.lru_cache(maxsize=8)
def _canvas_overlay(size: int) -> np.ndarray:
    """Canvas weave plus a warm varnish tint, added to every painting (cached)."""
    xs, ys = _grid(size)
    weave = 6.0 * (np.sin(xs * 1.9) * np.sin(ys * 1.9))[..., None]
    out = weave + np.array([200.0, 170.0, 120.0], dtype=np.float32) * 0.15
    out.flags.writeable = False
    return out


def _art(rng: np.random.Generator, polys, details, centre, radius, s: int):
    # Muted palette: low saturation, middling values, object and ground kept apart in value.
    g = _COARSE
    bg_v = rng.uniform(0.35, 0.8)
    bg1 = _hsv(rng.uniform(0, 360), rng.uniform(0.1, 0.35), bg_v)
    bg2_v = min(max(bg_v + rng.uniform(-0.2, 0.2), 0.0), 1.0)
    bg2 = _hsv(rng.uniform(0, 360), rng.uniform(0.1, 0.35), bg2_v)
    t = _smooth_noise(rng, g, 4)[..., None]
    bg = _field(bg1 * (1 - t) + bg2 * t, s)
    name, hue = _pick_hue(rng)
    obj_v = bg_v - 0.3 if bg_v > 0.55 else bg_v + 0.3
    obj = _hsv(hue, rng.uniform(0.3, 0.6), obj_v + rng.uniform(-0.06, 0.06))
    obj_img = _field(obj * (0.85 + 0.3 * _smooth_noise(rng, g, 6)[..., None]), s)
    if details:
        ImageDraw.Draw(obj_img).polygon(
            [tuple(q) for q in details[0].tolist()], fill=tuple(int(v * 0.6) for v in obj)
        )
    img = Image.composite(obj_img, bg, _mask(polys, s))
    if rng.random() < 0.5:  # a loose dark contour some painters use
        d = ImageDraw.Draw(img)
        c = tuple(int(v * 0.45) for v in obj)
        for p in polys:
            d.line(_closed(p), fill=c, width=_px(s, int(rng.integers(2, 4))), joint="curve")
    # Brush strokes: short thick dabs, each coloured from the paint beneath its start, so
    # they smear colour across edges without erasing the shape.
    src = np.asarray(img, dtype=np.int16)
    n = 180  # stroke size scales with the canvas, so a fixed count keeps the coverage
    px = rng.integers(0, s, size=n)
    py = rng.integers(0, s, size=n)
    ang = rng.uniform(0, math.pi) + rng.normal(0.0, 0.35, size=n)
    length = rng.uniform(s * 0.035, s * 0.075, size=n)
    widths = rng.integers(max(2, s // 32), max(3, s // 15) + 1, size=n).tolist()
    cols = np.clip(src[py, px] + rng.integers(-26, 27, size=(n, 3)), 0, 255).tolist()
    ex = (px + np.cos(ang) * length).tolist()
    ey = (py + np.sin(ang) * length).tolist()
    draw = ImageDraw.Draw(img)
    for x0, y0, x1, y1, col, w in zip(px.tolist(), py.tolist(), ex, ey, cols, widths, strict=True):
        draw.line([(x0, y0), (x1, y1)], fill=tuple(col), width=w)
    img = img.filter(ImageFilter.BoxBlur(max(1, s // 128)))
    arr = np.asarray(img, dtype=np.float32) * 0.85 + _canvas_overlay(s)
    return _to_image(arr), name


_STYLES = {"photo": _photo, "sketch": _sketch, "cartoon": _cartoon, "art_painting": _art}


# ----------------------------------------------------------------------------- public API


def _check(domain: str, class_name: str, seed: int, index: int, size: int) -> None:
    if domain not in _STYLES:
        raise ConfigError(unknown_name("synthetic domain", domain, DOMAINS))
    if class_name not in SHAPES:
        raise ConfigError(
            f"unknown synthetic class {class_name!r}; choose from {', '.join(CLASSES)}"
        )
    if seed < 0 or index < 0:
        raise ConfigError(f"seed and index must be >= 0 (got seed={seed}, index={index})")
    if size < _MIN_SIZE:
        raise ConfigError(f"image size must be >= {_MIN_SIZE} pixels, got {size}")


def _rng(seed: int, domain: str, class_name: str, index: int) -> np.random.Generator:
    # crc32 of the names (not hash(), which is salted per process) keeps streams stable.
    key = [seed, zlib.crc32(domain.encode()), zlib.crc32(class_name.encode()), index]
    return np.random.default_rng(np.random.SeedSequence(key))


def _render(domain: str, class_name: str, seed: int, index: int, size: int):
    _check(domain, class_name, seed, index, size)
    rng = _rng(seed, domain, class_name, index)
    canvas = size * _SS
    polys, details, centre, radius = _place(class_name, rng, canvas)
    img, colour = _STYLES[domain](rng, polys, details, centre, radius, canvas)
    return img.resize((size, size), Image.BOX), colour


def render(domain: str, class_name: str, seed: int, index: int, size: int = 64) -> Image.Image:
    """One RGB image, a pure function of its arguments (reproducible on its own)."""
    return _render(domain, class_name, seed, index, size)[0]


_TEMPLATES: dict[str, tuple[str, ...]] = {
    "photo": (
        "a photo of {a}",
        "a photograph of {a}",
        "a picture of {a}",
        "a close-up photo of {the}",
        "a blurry photo of {a}",
        "a bright photo of {the}",
        "{a} in a photo",
    ),
    "art_painting": (
        "a painting of {a}",
        "an oil painting of {a}",
        "a painting of {the}",
        "an artwork showing {a}",
        "a painted {n}",
        "a picture of {a}",
        "a brushy canvas painting of {a}",
    ),
    "cartoon": (
        "a cartoon of {a}",
        "a cartoon {n}",
        "a clip art {n}",
        "a cartoon drawing of {the}",
        "a picture of {a}",
        "a colorful cartoon of {a}",
    ),
    "sketch": (
        "a sketch of {a}",
        "a pencil sketch of {a}",
        "a black and white drawing of {a}",
        "a line drawing of {the}",
        "a picture of {a}",
        "a doodle of {a}",
        "a hand-drawn sketch of {the}",
    ),
}


def _article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def caption(domain: str, class_name: str, rng: random.Random, color: str | None = None) -> str:
    """A varied caption naming the class verbatim, for CLIP-style contrastive pretraining.

    `color` is the object's colour name (what `sample_batch` knows from rendering); it is
    mentioned only when given, so captions never describe a colour that is not in the image.
    """
    if domain not in _TEMPLATES:
        raise ConfigError(unknown_name("synthetic domain", domain, DOMAINS))
    noun = class_name
    if color and color != "pencil" and rng.random() < 0.4:
        noun = f"{color} {class_name}"
    template = rng.choice(_TEMPLATES[domain])
    return template.format(a=_article(noun), the="the " + noun, n=noun)


def _name_pattern(domain: str, class_name: str) -> tuple[str, str]:
    return f"{domain}_{class_name}_", ".png"


def write_dataset(
    out: Path,
    *,
    per_class: int = 30,
    seed: int = 0,
    size: int = 64,
    domains: Sequence[str] = DOMAINS,
    classes: Sequence[str] = CLASSES,
    progress: bool = False,
) -> dict:
    """Write out/<domain>/<class>/<domain>_<class>_<index:04d>.png; the same call, same bytes.

    Files from an earlier, larger run that follow this naming scheme are removed, so the
    folder always holds exactly what the summary says (scan_dataset would count them).
    """
    if per_class < 1:
        raise ConfigError(f"per_class must be >= 1, got {per_class}")
    domains, classes = tuple(domains), tuple(classes)
    if not domains or not classes:
        raise ConfigError("write_dataset needs at least one domain and one class")
    for d in domains:
        for c in classes:
            _check(d, c, seed, 0, size)
    out = make_out_dir(out)
    from fedclip_edge.progress import progress as track

    total = len(domains) * len(classes) * per_class
    with track("synth", total, "images", enabled=progress) as bar:
        for d in domains:
            bar.describe(d)
            for c in classes:
                folder = out / d / c
                folder.mkdir(parents=True, exist_ok=True)
                prefix, suffix = _name_pattern(d, c)
                for i in range(per_class):
                    target = folder / f"{prefix}{i:04d}{suffix}"
                    tmp = folder / f".{target.name}.tmp"
                    render(d, c, seed, i, size).save(tmp, format="PNG", compress_level=1)
                    os.replace(tmp, target)
                    bar.advance(1)
                for stale in folder.glob(f"{prefix}*{suffix}"):
                    stem = stale.name[len(prefix) : -len(suffix)]
                    if stem.isdigit() and int(stem) >= per_class:
                        stale.unlink()
    return {
        "root": str(out),
        "domains": list(domains),
        "classes": list(classes),
        "per_class": per_class,
        "images": len(domains) * len(classes) * per_class,
        "seed": seed,
        "size": size,
    }


def sample_batch(
    n: int,
    seed: int,
    size: int = 64,
    domains: Sequence[str] = DOMAINS,
    classes: Sequence[str] = CLASSES,
) -> tuple[list[Image.Image], list[str], list[int], list[str]]:
    """(images, captions, class indices into `classes`, domains), in memory, for pretraining.

    (domain, class) pairs are balanced (as even as n allows) and shuffled. Image indices are
    drawn from [2**30, 2**31), far above any written dataset's, so pretraining never sees an
    evaluation image; each image is still `render(domain, class, seed, index)`.
    """
    if n < 0:
        raise ConfigError(f"n must be >= 0, got {n}")
    domains, classes = tuple(domains), tuple(classes)
    if not domains or not classes:
        raise ConfigError("sample_batch needs at least one domain and one class")
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x5A3B1E]))
    pairs = [(d, ci) for d in domains for ci in range(len(classes))]
    reps = -(-n // len(pairs)) if n else 0
    order = rng.permutation(len(pairs) * reps)[:n] % len(pairs)
    indices = rng.integers(2**30, 2**31, size=n)
    cap_rng = random.Random(int(rng.integers(2**62)))
    images, captions, labels, doms = [], [], [], []
    for k, idx in zip(order.tolist(), indices.tolist(), strict=True):
        d, ci = pairs[k]
        img, colour = _render(d, classes[ci], seed, idx, size)
        images.append(img)
        captions.append(caption(d, classes[ci], cap_rng, color=colour))
        labels.append(ci)
        doms.append(d)
    return images, captions, labels, doms
