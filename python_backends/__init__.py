"""mmfuse's serving logic as plain Python modules (installed as ``mmfuse.serving``).

Nothing here imports Triton but ``triton_model.py``, the one model.py of the ``mmfuse`` Triton
backend: every Python model of a repository names its handler in config.pbtxt (``handler.py``) and the
adapter (``adapter.py``) hands it numpy arrays. The modules are unit-tested without a server.
"""
from pathlib import Path


def triton_model_path() -> Path:
    """The file Triton runs as ``<backend directory>/mmfuse/model.py``."""
    return Path(__file__).resolve().parent / "triton_model.py"
