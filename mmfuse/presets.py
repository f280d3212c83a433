"""Names and defaults shared by `mmfuse train` and mmfuse.training (light: no torch import)."""
PRESETS = ("late", "late-gmu", "early", "hybrid", "attention", "attention-llava")
DEFAULTS = {"model_name": "mmfuse-demo", "steps": 3000, "batch_size": 64, "lr": 2e-3, "seed": 0,
            "modality_dropout": 0.1, "curriculum_steps": 600,
            # One torch thread: on a shared 2-core machine two threads ran 5-20x slower per step.
            "threads": 1}


def preset_hparams(name: str, image_width: int, text_width: int, image_tokens: int, *, task: str = "match",
                   classes=None, overrides: dict | None = None) -> dict:
    """A preset's strategy hyper-parameters for encoders of these token widths, with its task head for ``task``.
    The key ``_needs_sequences`` says whether the strategy reads token sequences (pop it before building)."""
    head = "similarity" if task == "match" else "classifier"
    defaults = {
        "late": {"gate": "fixed", "head": head},
        "late-gmu": {"gate": "gmu", "head": head},
        "early": {"hidden": 256, "layers": 2},
        "hybrid": {"widths": [image_width, text_width], "dim": 96, "heads": 4, "layers": 2},
        "attention": {"image_width": image_width, "text_width": text_width, "dim": 96, "heads": 4, "layers": 2,
                      "image_tokens": image_tokens},
        "attention-llava": {"image_width": image_width, "text_width": text_width, "dim": 96, "heads": 4,
                            "layers": 2, "projector": "llava", "image_tokens": image_tokens},
    }
    if name not in defaults:
        raise KeyError(f"unknown strategy preset {name!r}; known: {', '.join(defaults)}")
    out = {**defaults[name], **(overrides or {}), "_needs_sequences": name in SEQUENCE_PRESETS}
    if task != "match":
        out.update(task=task, classes=list(classes or ()))
    return out


SEQUENCE_PRESETS = ("hybrid", "attention", "attention-llava")
