"""Small PNG previews for the curation gallery: one image, or a source|target row."""

from __future__ import annotations

import io
from collections.abc import Sequence

from PIL import Image


def fit_image(img: Image.Image, size: int = 128) -> Image.Image:
    """Scale `img` to fit a `size` x `size` box, aspect kept.

    Larger images are downscaled smoothly (Lanczos). Smaller ones are upscaled by the largest
    whole factor that fits, nearest-neighbour, so 32-64 px bench images stay crisp pixel art
    instead of blurring; an image between size/2 and size is left as it is.
    """
    if size < 1:
        raise ValueError("thumbnail size must be at least 1 px")
    if img.mode not in ("RGB", "RGBA"):
        img = img.convert("RGBA" if "A" in img.getbands() else "RGB")
    w, h = img.size
    longest = max(w, h)
    if longest > size:
        scale = size / longest
        new = (max(1, round(w * scale)), max(1, round(h * scale)))
        return img.resize(new, Image.Resampling.LANCZOS)
    factor = size // longest
    if factor > 1:
        return img.resize((w * factor, h * factor), Image.Resampling.NEAREST)
    return img.copy()


def make_thumbnail(img: Image.Image, size: int = 128) -> bytes:
    """PNG bytes of `fit_image(img, size)`."""
    return _png(fit_image(img, size))


def contact_row(
    images: Sequence[Image.Image],
    size: int = 128,
    gap: int = 4,
    background: tuple[int, int, int] = (255, 255, 255),
) -> bytes:
    """PNG bytes of the images side by side (e.g. source | target), each centred in a size x size cell."""
    if not images:
        raise ValueError("contact_row needs at least one image")
    row = Image.new("RGB", (len(images) * size + (len(images) - 1) * gap, size), background)
    for i, img in enumerate(images):
        thumb = fit_image(img, size)
        x = i * (size + gap) + (size - thumb.width) // 2
        y = (size - thumb.height) // 2
        row.paste(thumb, (x, y), thumb if thumb.mode == "RGBA" else None)
    return _png(row)


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()
