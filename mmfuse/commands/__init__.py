"""Sub-commands of ``mmfuse``. Each module defines ``register(subparsers)``; add new ones to COMMANDS."""
COMMANDS = ("serve", "infer", "demo", "train", "compare", "reconfigure",
            "gen-clients", "init", "embed", "fuse", "health", "metadata", "ensembles", "bench-pipeline", "protoset",
            "eval", "bench", "apply-profile", "config-docs", "make-dataset")
