"""Typed access to a Triton model's config.pbtxt ``parameters``.

Triton hands every parameter over as a string. ``Params`` parses each one once,
at load time, and every error names the model, the key, the bad value and what
was expected, so that a typo in config.pbtxt fails the load with a clear message
instead of being ignored.
"""
from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ConfigError

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}

# Keys that Triton itself interprets; never reported as unknown.
TRITON_KEYS = frozenset({"EXECUTION_ENV_PATH", "FORCE_CPU_ONLY_INPUT_TENSORS"})
#: The key naming a model's handler (read by the adapter, not by the handler: see handler.py).
HANDLER_KEY = "handler"

_MISSING = object()


@dataclass(frozen=True)
class ModelContext:
    """Where a handler runs: facts Triton passes to ``initialize``."""

    model_name: str
    model_dir: Path  # <repository>/<model name>
    instance_kind: str = "CPU"  # CPU | GPU | MODEL
    device_id: int = 0
    version: int = 1

    @classmethod
    def from_triton_args(cls, args: Mapping[str, str]) -> ModelContext:
        kind = str(args.get("model_instance_kind", "CPU")).upper().replace("KIND_", "")
        repo = Path(args.get("model_repository", "."))
        name = args.get("model_name", repo.name)
        # Triton passes the model's own folder as "model_repository".
        model_dir = repo if repo.name == name else repo / name
        return cls(
            model_name=name,
            model_dir=model_dir,
            instance_kind=kind,
            device_id=int(args.get("model_instance_device_id", 0) or 0),
            version=int(args.get("model_version", 1) or 1),
        )

    @staticmethod
    def latest_version(model_dir: Path | None) -> int:
        """The version Triton serves by default (the highest numbered folder), for offline checks."""
        if model_dir is None or not Path(model_dir).is_dir():
            return 1
        numbers = [int(p.name) for p in Path(model_dir).iterdir() if p.is_dir() and p.name.isdigit()]
        return max(numbers, default=1)

    @property
    def version_dir(self) -> Path:
        return self.model_dir / str(self.version)

    @property
    def torch_device(self) -> str:
        return f"cuda:{self.device_id}" if self.instance_kind == "GPU" else "cpu"


def parameters_from_config(model_config: Mapping[str, Any]) -> dict[str, str]:
    """``config["parameters"]`` as a flat ``{key: string_value}`` dict."""
    raw = model_config.get("parameters") or {}
    out = {}
    for key, value in raw.items():
        out[key] = value.get("string_value", "") if isinstance(value, Mapping) else str(value)
    return out


class Params:
    """Parse string parameters into typed values; remember which keys were read."""

    def __init__(self, model_name: str, raw: Mapping[str, str]):
        self.model_name = model_name
        self._raw = {str(k): str(v) for k, v in raw.items()}
        self._read: set[str] = set()

    @classmethod
    def from_model_config(cls, model_name: str, model_config: Mapping[str, Any] | str) -> Params:
        if isinstance(model_config, str):
            model_config = json.loads(model_config)
        return cls(model_name, parameters_from_config(model_config))

    # -- low level ---------------------------------------------------------------
    def _get(self, key: str, default: Any) -> Any:
        self._read.add(key)
        if key in self._raw:
            return self._raw[key].strip()
        if default is _MISSING:
            raise ConfigError(f"model '{self.model_name}': required parameter '{key}' is missing from config.pbtxt")
        return default

    def _bad(self, key: str, value: str, expected: str) -> ConfigError:
        return ConfigError(f"model '{self.model_name}': parameter '{key}' = {value!r} is invalid: expected {expected}")

    def has(self, key: str) -> bool:
        return key in self._raw

    # -- typed getters -------------------------------------------------------------
    def str(self, key: str, default: Any = _MISSING) -> str:
        return self._get(key, default)

    def bool(self, key: str, default: bool) -> bool:
        value = self._get(key, None)
        if value is None:
            return default
        low = value.lower()
        if low in _TRUE:
            return True
        if low in _FALSE:
            return False
        raise self._bad(key, value, "true or false")

    def int(self, key: str, default: Any = _MISSING, *, minimum: int | None = None, maximum: int | None = None) -> int:
        value = self._get(key, default)
        if not isinstance(value, str):
            return value
        try:
            number = int(value.replace("_", ""))
        except ValueError:
            raise self._bad(key, value, "an integer") from None
        self._check_range(key, value, number, minimum, maximum)
        return number

    def float(self, key: str, default: Any = _MISSING, *, minimum: float | None = None, maximum: float | None = None) -> float:
        value = self._get(key, default)
        if not isinstance(value, str):
            return value
        try:
            number = float(value)
        except ValueError:
            raise self._bad(key, value, "a number") from None
        self._check_range(key, value, number, minimum, maximum)
        return number

    def choice(self, key: str, default: Any, choices: Sequence[str]) -> str:
        value = self._get(key, default)
        if value not in choices:
            raise self._bad(key, value, "one of " + ", ".join(choices))
        return value

    def list(self, key: str, default: Any = _MISSING) -> tuple[str, ...]:
        value = self._get(key, default)
        if not isinstance(value, str):
            return tuple(value)
        items = tuple(item.strip() for item in value.split(",") if item.strip())
        if not items:
            raise self._bad(key, value, "a comma-separated list")
        return items

    def floats(self, key: str, default: Any = _MISSING) -> tuple[float, ...]:
        items = self.list(key, default)
        try:
            return tuple(float(item) for item in items)
        except ValueError:
            raise self._bad(key, ",".join(items), "comma-separated numbers") from None

    def _check_range(self, key, value, number, minimum, maximum) -> None:
        if number != number and (minimum is not None or maximum is not None):  # NaN compares false
            raise self._bad(key, value, "a number, not NaN")
        if minimum is not None and number < minimum:
            raise self._bad(key, value, f">= {minimum}")
        if maximum is not None and number > maximum:
            raise self._bad(key, value, f"<= {maximum}")

    def reject_unknown(self, also_known: Iterable[str] = ()) -> None:
        """Fail on keys no getter asked for: a misspelt key must not be ignored silently."""
        known = self._read | set(also_known) | TRITON_KEYS | {HANDLER_KEY}
        unknown = sorted(set(self._raw) - known)
        if unknown:
            raise ConfigError(
                f"model '{self.model_name}': unknown parameter(s) {', '.join(unknown)}; "
                f"known: {', '.join(sorted(self._read))}"
            )
