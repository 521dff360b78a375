"""Images with known words in them, for OCR tests and the ``ocr`` bench suite.

Two kinds: photo-like scenes (gradients, shapes and sensor-like noise) with a sign of two or three words rendered onto them in a chosen font, size, colour
and angle; and plain screenshots (dark text on a light background, several short lines). Fonts
are the DejaVu faces where the system has them (Debian's fonts-dejavu-core), else Pillow's own.
"""

from __future__ import annotations

import glob
from pathlib import Path
from typing import Any

# Distinct, dictionary-like words (OCR is judged on whole words): no word is a prefix of another.
VOCABULARY = (
    "harbour bakery garden station museum library theatre market bridge castle river forest window "
    "orange purple silver golden yellow winter summer autumn spring morning evening coffee butter "
    "pepper ticket parking exit entrance platform gallery kitchen office pharmacy hotel closed open "
    "daily sunday monday friday street avenue north south east west central public private welcome"
).split()
_FONT_GLOBS = ("/usr/share/fonts/truetype/dejavu/DejaVu*.ttf", "/usr/share/fonts/**/DejaVu*.ttf")


def fonts() -> list[str]:
    """Font files to render with (sorted; empty: only Pillow's built-in font)."""
    found: set[str] = set()
    for pattern in _FONT_GLOBS:
        found.update(glob.glob(pattern, recursive=True))
    # the math and extra-light faces render glyphs few signs use
    return sorted(f for f in found if "Math" not in f and "ExtraLight" not in f)


def _font(path: str | None, size: int) -> Any:
    from PIL import ImageFont

    return ImageFont.truetype(path, size) if path else ImageFont.load_default(size=size)


def scene(rng: Any, width: int, height: int) -> Any:
    """An (H, W, 3) uint8 photo-like array: a two-axis gradient, a few ellipses, Gaussian noise."""
    import numpy as np

    y = np.linspace(0.0, 1.0, height, dtype=np.float32)[:, None, None]
    x = np.linspace(0.0, 1.0, width, dtype=np.float32)[None, :, None]
    c0, cx, cy = (rng.uniform(0, 255, 3).astype(np.float32) for _ in range(3))
    img = c0 * 0.5 + cx * x * 0.5 + cy * y * 0.5
    yy, xx = np.mgrid[0:height, 0:width]
    for _ in range(int(rng.integers(2, 6))):
        cxp, cyp = rng.uniform(0, width), rng.uniform(0, height)
        rx, ry = rng.uniform(0.05, 0.3) * width, rng.uniform(0.05, 0.3) * height
        img[((xx - cxp) / rx) ** 2 + ((yy - cyp) / ry) ** 2 <= 1.0] = rng.uniform(0, 255, 3)
    img += rng.normal(0.0, 6.0, img.shape).astype(np.float32)
    return np.clip(img, 0, 255).astype(np.uint8)


def sign_image(path: str | Path, words: list[str], *, background: Any = None, size: tuple[int, int] = (480, 320),
               font: str | None = None, font_px: int = 40, angle: float = 0.0, color: tuple[int, int, int] = (20, 20, 20),
               plate: tuple[int, int, int] | None = (245, 240, 225), seed: int = 0) -> Path:
    """A photo-like image with ``words`` on a sign (a light plate, or none), turned by ``angle``
    degrees, somewhere in the middle. ``background``: an RGB array (default: a generated photo)."""
    import numpy as np
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    bg = Image.fromarray(background if background is not None else scene(rng, size[0], size[1]))
    f = _font(font, font_px)
    text = " ".join(words)
    left, top, right, bottom = ImageDraw.Draw(bg).textbbox((0, 0), text, font=f)
    pad = max(6, font_px // 4)
    sign = Image.new("RGBA", (right - left + 2 * pad, bottom - top + 2 * pad), (*plate, 255) if plate else (0, 0, 0, 0))
    ImageDraw.Draw(sign).text((pad - left, pad - top), text, font=f, fill=(*color, 255))
    sign = sign.rotate(angle, expand=True, resample=Image.BICUBIC)
    w, h = bg.size
    x = max(0, (w - sign.width) // 2 + int(rng.integers(-w // 10, w // 10 + 1)))
    y = max(0, (h - sign.height) // 2 + int(rng.integers(-h // 10, h // 10 + 1)))
    bg.paste(sign, (x, y), sign)
    return _save(bg, path)


def screenshot_image(path: str | Path, lines: list[str], *, font: str | None = None, font_px: int = 18,
                     width: int = 480) -> Path:
    """Dark text lines on a light background, like a screenshot of a note or a chat."""
    from PIL import Image, ImageDraw

    f = _font(font, font_px)
    line_h = int(font_px * 1.6)
    im = Image.new("RGB", (width, line_h * len(lines) + 2 * font_px), (250, 250, 252))
    d = ImageDraw.Draw(im)
    for i, line in enumerate(lines):
        d.text((font_px, font_px + i * line_h), line, font=f, fill=(30, 30, 35))
    return _save(im, path)


def _save(im: Any, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() in (".jpg", ".jpeg"):
        im.convert("RGB").save(path, quality=90)
    else:
        im.convert("RGB").save(path)
    return path


def make_ocr_set(folder: str | Path, n_signs: int, n_screens: int, *, seed: int = 0) -> list[dict[str, Any]]:
    """``n_signs`` photo-like images with a sign and ``n_screens`` screenshots in ``folder``, each
    with words from :data:`VOCABULARY`: [{path, kind, words, all_words, font, font_px, angle}]
    (``words``: a sign's phrase, a screenshot's first line, in order; ``all_words``: every word
    written on it)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    faces = fonts() or [None]
    out = []
    vocab = list(VOCABULARY)
    for i in range(n_signs):
        words = [str(w) for w in rng.choice(vocab, size=int(rng.integers(2, 4)), replace=False)]
        font = faces[i % len(faces)]
        font_px = int(rng.choice([18, 26, 36, 48]))
        angle = float(rng.choice([0.0, 0.0, -8.0, 6.0, 15.0, -20.0]))
        path = sign_image(Path(folder) / f"sign{i:04d}.jpg", words, font=font, font_px=font_px, angle=angle, seed=seed * 1000 + i,
                          color=(20, 20, 20) if i % 3 else (160, 20, 20))
        out.append({"path": str(path), "kind": "sign", "words": words, "all_words": words, "font": Path(font).stem if font else "default",
                    "font_px": font_px, "angle": angle})
    for i in range(n_screens):
        lines = [" ".join(str(w) for w in rng.choice(vocab, size=3, replace=False)) for _ in range(12)]  # a phone-shaped page
        font = faces[(i * 5) % len(faces)]
        font_px = int(rng.choice([14, 16, 20]))
        path = screenshot_image(Path(folder) / f"screen{i:04d}.png", lines, font=font, font_px=font_px)
        out.append({"path": str(path), "kind": "screenshot", "words": lines[0].split(), "all_words": " ".join(lines).split(), "font": Path(font).stem if font else "default",
                    "font_px": font_px, "angle": 0.0})
    return out
