"""Names and defaults shared by `mmfuse train` and mmfuse.training (light: no torch import)."""
PRESETS = ("late", "late-gmu", "early", "hybrid", "attention", "attention-llava")
DEFAULTS = {"model_name": "mmfuse-demo", "steps": 3000, "batch_size": 64, "lr": 2e-3, "seed": 0,
            "modality_dropout": 0.1, "curriculum_steps": 600,
            # One torch thread: on a shared 2-core machine two threads ran 5-20x slower per step.
            "threads": 1}
