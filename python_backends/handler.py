"""The contract every served model's handler follows, and the names config.pbtxt binds them by.

A Python model of the repository runs the ``mmfuse`` backend (``backend: "mmfuse"``); its config.pbtxt
names the handler in a parameter::

    parameters { key: "handler" value: { string_value: "fusion" } }

The value is a name of ``HANDLERS`` below, or ``package.module:Class`` for a handler of your own (a
subclass of ``Handler`` importable by the server's Python).

A handler's life has two steps, kept apart so that offline validation (``mmfuse reconfigure``,
``mmfuse apply-profile``, ``mmfuse init``) parses a configuration without building anything:

1. ``parse(context, params) -> Config``: the ``parameters {}`` of config.pbtxt into a frozen, validated
   config object; reads no weights, starts no threads. ``input_specs(config)`` and
   ``output_names(config)`` say what a handler of that config reads and writes.
2. ``build(context, config) -> Handler``: loads weights, starts what it needs.

Then ``handler(batch, requested) -> outputs`` runs once per dynamic batch, and ``close()`` at unload.
"""
from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from .errors import ConfigError
from .params import HANDLER_KEY as HANDLER_PARAMETER
from .params import ModelContext, Params

#: The handlers mmfuse ships, by the name config.pbtxt uses. Imported only when a model asks for one
#: (the preprocessors never import torch).
HANDLERS: dict[str, str] = {
    "image_preprocess": "mmfuse.serving.image_preprocess:ImagePreprocessor",
    "text_preprocess": "mmfuse.serving.text_preprocess:TextPreprocessor",
    "image_encoder": "mmfuse.serving.encoders:ImageEncoder",
    "text_encoder": "mmfuse.serving.encoders:TextEncoder",
    "tabular_encoder": "mmfuse.serving.tabular:TabularEncoder",
    "fusion": "mmfuse.serving.fusion:FusionHandler",
}


@dataclass(frozen=True)
class InputSpec:
    """A tensor a handler reads. ``kind`` is a numpy dtype kind check: 'O' strings, 'b' bool, 'f', 'i'."""

    name: str
    kind: str
    optional: bool = False
    # Rank of one row (without the batch dimension), None for "any".
    row_rank: int | None = None


class Handler(ABC):
    """Base class of every handler. Subclasses set ``name``, ``metrics_labels``, ``parameters`` (and
    ``INPUTS``/``OUTPUTS`` or the methods that derive them from the config) and implement ``parse``,
    ``build`` and ``__call__``."""

    #: The name config.pbtxt's ``handler`` parameter uses.
    name: ClassVar[str]
    #: (modality, stage) of the per-modality metrics: ("image", "encode"), ("all", "fusion") ...
    metrics_labels: ClassVar[tuple[str, str]]
    #: Every ``parameters {}`` key ``parse`` reads -> what it means (docs/configuration.md is generated from
    #: these and from the parsing itself: types, defaults, ranges and choices are recorded, not written twice).
    parameters: ClassVar[Mapping[str, str]] = {}
    #: Parameter sets that parse (no weights needed) and together reach every key, for the generated docs.
    doc_examples: ClassVar[tuple[Mapping[str, str], ...]] = ({},)

    #: What a handler reads and writes when that does not depend on its config (else override the methods).
    INPUTS: ClassVar[tuple[InputSpec, ...]] = ()
    OUTPUTS: ClassVar[tuple[str, ...]] = ()

    config: Any  # the parsed config this handler was built from

    # -- configuration: no weights, no threads --------------------------------------------------------------------
    @classmethod
    @abstractmethod
    def parse(cls, context: ModelContext, params: Params) -> Any:
        """``parameters {}`` -> a frozen config object; every error names the model, the key and the value."""

    @classmethod
    def input_specs(cls, config: Any) -> tuple[InputSpec, ...]:
        """The tensors a handler of this config reads."""
        return cls.INPUTS

    @classmethod
    def output_names(cls, config: Any) -> tuple[str, ...]:
        """Every output a handler of this config can write."""
        return cls.OUTPUTS

    @classmethod
    def optional_output_names(cls, config: Any) -> tuple[str, ...]:
        """Outputs config.pbtxt may declare that this config does not give (e.g. SCORE without a task head)."""
        return ()

    # -- serving --------------------------------------------------------------------------------------------------
    @classmethod
    @abstractmethod
    def build(cls, context: ModelContext, config: Any) -> Handler:
        """Load weights and build the handler."""

    @classmethod
    def from_parameters(cls, context: ModelContext, params: Params) -> Handler:
        return cls.build(context, cls.parse(context, params))

    @property
    def inputs(self) -> tuple[InputSpec, ...]:
        return type(self).input_specs(self.config)

    @property
    def optional_outputs(self) -> tuple[str, ...]:
        return type(self).optional_output_names(self.config)

    @abstractmethod
    def __call__(self, batch: Mapping[str, np.ndarray], requested: frozenset[str]) -> dict[str, np.ndarray]:
        """Rows of every input, concatenated over the dynamic batch -> outputs with the same row count."""

    def close(self) -> None:  # noqa: B027 - optional hook: most handlers hold nothing to release
        """Release threads and memory; called once when Triton unloads the model."""


def resolve(name: str, model_name: str = "?") -> type[Handler]:
    """The handler class a ``handler`` parameter names (a HANDLERS key, or ``module:Class``)."""
    target = HANDLERS.get(name, name)
    if ":" not in target:
        raise ConfigError(f"model '{model_name}': parameter '{HANDLER_PARAMETER}' = {name!r} is not a handler: "
                          f"expected one of {', '.join(HANDLERS)} or 'package.module:Class'")
    module_name, _, attr = target.partition(":")
    try:
        cls = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as error:
        raise ConfigError(f"model '{model_name}': handler {name!r} ({target}) cannot be imported: {error}") from None
    if not (isinstance(cls, type) and issubclass(cls, Handler)):
        raise ConfigError(f"model '{model_name}': handler {name!r} ({target}) is not a subclass of "
                          "mmfuse.serving.handler.Handler")
    return cls


def handler_of(params: Params) -> type[Handler]:
    """The handler class a model's parameters name; a missing parameter names the fix."""
    if not params.has(HANDLER_PARAMETER):
        raise ConfigError(f"model '{params.model_name}': config.pbtxt names no handler: add parameters "
                          f"{{ key: \"{HANDLER_PARAMETER}\" value: {{ string_value: \"NAME\" }} }} with NAME one of "
                          f"{', '.join(HANDLERS)}")
    return resolve(params.str(HANDLER_PARAMETER), params.model_name)


def undeclared_inputs(model_name: str, specs: Sequence[InputSpec], declared: Sequence[str],
                      handler_name: str = "its handler") -> list[str]:
    """One message per required input the handler reads that config.pbtxt does not declare."""
    return [
        f"model '{model_name}': {handler_name} reads input '{spec.name}', which config.pbtxt does not declare "
        f"(inputs: {', '.join(declared) or 'none'}); an image_encoder with decode_images reads IMAGE, without it "
        "PIXELS"
        for spec in specs if not spec.optional and spec.name not in declared
    ]


def check_config(context: ModelContext, params: Params, declared_inputs: Sequence[str],
                 declared_outputs: Sequence[str] = ()) -> tuple[type[Handler], Any]:
    """Parse a model's parameters with its handler's own parsing, offline: (handler class, config).

    Raises ConfigError for an unknown handler, a bad or unknown key, an input the handler reads that
    config.pbtxt does not declare, or an output config.pbtxt declares that the handler never writes.
    Builds nothing.
    """
    cls = handler_of(params)
    config = cls.parse(context, params)
    params.reject_unknown()
    errors = undeclared_inputs(context.model_name, cls.input_specs(config), declared_inputs, cls.name)
    writes = cls.output_names(config)
    errors += [f"model '{context.model_name}': config.pbtxt declares output '{name}', which {cls.name} never writes "
               f"(it writes: {', '.join(writes)})" for name in declared_outputs if name not in writes]
    if errors:
        raise ConfigError("; ".join(errors))
    return cls, config
