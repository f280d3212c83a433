"""``python -m mmfuse.bench --gpu OUT.json``: the in-process half of the bench, e.g. on a GPU host."""
from .run import main_gpu

if __name__ == "__main__":
    raise SystemExit(main_gpu())
