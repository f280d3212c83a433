"""Shared test helpers: images made by the tests or shipped by scikit-image (nothing is fetched)."""
from __future__ import annotations

import io

import numpy as np
import pytest


def encode(array_or_image, fmt: str = "JPEG", **kwargs) -> bytes:
    from PIL import Image

    image = array_or_image if isinstance(array_or_image, Image.Image) else Image.fromarray(array_or_image)
    out = io.BytesIO()
    image.save(out, format=fmt, **kwargs)
    return out.getvalue()


@pytest.fixture(scope="session")
def photos() -> dict[str, np.ndarray]:
    """Real photographs that ship inside scikit-image."""
    from skimage import data

    return {"astronaut": data.astronaut(), "coffee": data.coffee(), "chelsea": data.chelsea()}
