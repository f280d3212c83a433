"""Paths of the checkout the tests run in (never the installed package's)."""
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
SHIPPED_REPOSITORY = REPO_ROOT / "model_repository"
