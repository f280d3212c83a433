"""Small synthetic images for the demo and tests (no data is fetched)."""
from __future__ import annotations

import io

COLOURS = {
    "red": (220, 30, 30), "green": (30, 170, 60), "blue": (40, 70, 220),
    "yellow": (235, 210, 30), "purple": (140, 50, 170), "orange": (245, 140, 20),
}


def shape_image(colour: str, shape: str, size: int = 64, fmt: str = "PNG") -> bytes:
    """One coloured circle, square or triangle on white, encoded as ``fmt``."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(image)
    box = (size * 0.2, size * 0.2, size * 0.8, size * 0.8)
    fill = COLOURS[colour]
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    elif shape == "triangle":
        draw.polygon([(size * 0.5, size * 0.15), (size * 0.85, size * 0.8), (size * 0.15, size * 0.8)], fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    out = io.BytesIO()
    image.save(out, format=fmt)
    return out.getvalue()
