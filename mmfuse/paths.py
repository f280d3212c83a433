"""Where mmfuse finds what it ships, installed from a wheel or run from a checkout.

Commands never default to writing into the installed package or the source tree: their default model
repository is ``./model_repository`` (the current directory's), and outputs go where ``--out`` says.
"""
from __future__ import annotations

from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent

#: What a command reads when no --model-repository is given: relative to the current directory.
DEFAULT_MODEL_REPOSITORY = Path("model_repository")


def shipped_repository() -> Path:
    """The demo repository mmfuse ships (the template of ``mmfuse init``): in the wheel it is
    ``mmfuse/model_repository``; in a checkout, the top-level ``model_repository/``."""
    for candidate in (PACKAGE_DIR / "model_repository", PACKAGE_DIR.parent / "model_repository"):
        if (candidate / "fuse_image_text" / "config.pbtxt").is_file():
            return candidate
    raise FileNotFoundError(f"the shipped model repository is not installed with mmfuse ({PACKAGE_DIR})")
