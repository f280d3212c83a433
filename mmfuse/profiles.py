"""Serving profiles: the settings of a repository's composing models for a kind of machine, as data.

A profile is a JSON file in mmfuse/profiles/ (``baseline``, ``cpu``, ``latency``, ``gpu``), or ``auto`` /
``auto-latency``, chosen for the machine at hand by mmfuse.auto from mmfuse/profiles/auto/rules.json: per model, the instance group,
dynamic batching and handler parameters, each with a one-line reason; and two topology choices,

* ``decoding``: ``separate`` (image_preprocess is a model of its own) or ``in_encoder`` (each image encoder
  instance decodes its own batch: image_preprocess's parameters go to the encoder, its step leaves the
  ensembles);
* ``route_sequences``: whether fuse_image_text routes the encoders' token sequences into its fusion step (a
  late deployment does not need them).

The measurements that chose the settings are in docs/performance.md and the bench JSON, not here.
``apply_profile`` is the one function that writes a profile into a repository (``mmfuse init``,
``mmfuse apply-profile``, ``mmfuse bench``).
"""
from __future__ import annotations

import json
import textwrap
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

PROFILE_DIR = Path(__file__).resolve().parent / "profiles"
DECODING = ("separate", "in_encoder")
KINDS = ("KIND_CPU", "KIND_GPU")


@dataclass(frozen=True)
class Tuning:
    """Serving settings of one composing model, and why."""

    kind: str = "KIND_CPU"
    count: int = 1
    preferred: tuple[int, ...] = ()
    delay_us: int = 1000
    params: dict[str, str] = field(default_factory=dict)
    why: str = ""


@dataclass(frozen=True)
class Profile:
    name: str
    description: str
    decoding: str  # separate | in_encoder
    route_sequences: bool
    models: dict[str, Tuning]

    @property
    def merges_decoding(self) -> bool:
        return self.decoding == "in_encoder"


#: Resolved on the machine that applies them (mmfuse.auto): detect the hardware, pick from the profiles' data.
AUTO_PROFILES = ("auto", "auto-latency")
PRECISIONS = ("fp32", "bf16", "fp16", "int8", "auto")


def profile_names() -> list[str]:
    return sorted(p.stem for p in PROFILE_DIR.glob("*.json")) + list(AUTO_PROFILES)


def _bad(name: str, message: str) -> ValueError:
    return ValueError(f"profile {name!r} ({PROFILE_DIR / (name + '.json')}): {message}")


@cache
def load_profile(name: str, precision: str | None = None) -> Profile:
    """Read and check one profile; every error names the file and the field. ``auto`` and ``auto-latency`` are
    chosen for this machine (mmfuse.auto); ``precision`` replaces the encoders' (int8 brings engine openvino)."""
    if name in AUTO_PROFILES:
        from .auto import resolve

        return resolve(name, precision).profile
    profile = _read_profile(name)
    return with_precision(profile, precision) if precision else profile


def with_precision(profile: Profile, precision: str) -> Profile:
    """``profile`` with the encoders' precision replaced (int8 runs on engine openvino)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    models = dict(profile.models)
    for model in ("image_encoder", "text_encoder"):
        if model in models:
            tuning = models[model]
            if precision == "bf16" and tuning.kind == "KIND_CPU" and not _bf16_units():
                raise ValueError(f"profile {profile.name!r}: precision bf16 on a CPU without bf16 units (AMX or "
                                 "AVX512-BF16) would be emulated, ~10x slower than fp32; choose fp32, int8 or auto "
                                 "(preparing a repository for another machine: set MMFUSE_CPU_FLAGS to its flags)")
            if precision == "int8" and tuning.kind == "KIND_GPU":
                raise ValueError(f"profile {profile.name!r}: precision int8 runs on OpenVINO's CPU plugin, not on "
                                 f"{model}'s KIND_GPU instances")
            params = {**tuning.params, "precision": precision}
            if precision == "int8":
                params["engine"] = "openvino"
            models[model] = Tuning(tuning.kind, tuning.count, tuning.preferred, tuning.delay_us, params,
                                   f"{tuning.why}; precision {precision} asked for")
    return Profile(profile.name, profile.description, profile.decoding, profile.route_sequences, models)


def _bf16_units() -> bool:
    from .serving import hardware

    return hardware.has_bf16_units(hardware.cpu_model_and_flags()[1])


def _read_profile(name: str) -> Profile:
    path = PROFILE_DIR / f"{name}.json"
    if not path.is_file():
        raise ValueError(f"unknown profile {name!r}; known: {', '.join(profile_names())}")
    data = json.loads(path.read_text())
    unknown = set(data) - {"description", "decoding", "route_sequences", "models"}
    if unknown:
        raise _bad(name, f"unknown field(s) {', '.join(sorted(unknown))}")
    if data.get("decoding", "separate") not in DECODING:
        raise _bad(name, f"decoding must be one of {', '.join(DECODING)}, not {data.get('decoding')!r}")
    models = {}
    for model, entry in data.get("models", {}).items():
        extra = set(entry) - {"kind", "count", "preferred", "delay_us", "params", "why"}
        if extra:
            raise _bad(name, f"model {model!r}: unknown field(s) {', '.join(sorted(extra))}")
        tuning = Tuning(kind=entry.get("kind", "KIND_CPU"), count=int(entry.get("count", 1)),
                        preferred=tuple(int(b) for b in entry.get("preferred", ())),
                        delay_us=int(entry.get("delay_us", 1000)),
                        params={str(k): str(v) for k, v in entry.get("params", {}).items()},
                        why=str(entry.get("why", "")))
        if tuning.kind not in KINDS or tuning.count < 1 or tuning.delay_us < 0 or not tuning.why:
            raise _bad(name, f"model {model!r}: needs kind in {KINDS}, count >= 1, delay_us >= 0 and a reason (why)")
        models[model] = tuning
    return Profile(name, str(data.get("description", "")), data.get("decoding", "separate"),
                   bool(data.get("route_sequences", True)), models)


def _write_tuning(repository: Path, model: str, tuning: Tuning, profile: str, notes: list[str]) -> None:
    """Apply ``tuning`` to ``repository/model/config.pbtxt``, with the reasons as the comment heading it."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    from .repository import config_path, load_config

    config = load_config(repository, model)
    del config.instance_group[:]
    group = config.instance_group.add()
    group.kind = model_config_pb2.ModelInstanceGroup.Kind.Value(tuning.kind)
    group.count = tuning.count
    if tuning.kind == "KIND_GPU":
        group.gpus.append(0)
    batching = config.dynamic_batching
    del batching.preferred_batch_size[:]
    batching.preferred_batch_size.extend(tuning.preferred)
    batching.max_queue_delay_microseconds = tuning.delay_us
    for key, value in tuning.params.items():
        config.parameters[key].string_value = value
    header = [f"# mmfuse profile '{profile}' for {model}: {notes[0]}"] + [f"#   {n}" for n in notes[1:]]
    wrapped = [line for note in header for line in (textwrap.wrap(note, 110, subsequent_indent="#   ") or [note])]
    config_path(repository, model).write_text("\n".join(wrapped) + "\n" + text_format.MessageToString(config))


def apply_profile(repository: Path, profile: str | Profile, decoding: str | None = None,
                  extra_params: dict[str, dict[str, str]] | None = None) -> list[str]:
    """Write ``profile`` into the models of ``repository`` it tunes (instances, batching, parameters, with
    their reasons as comments) and realise its topology (``decoding``, which the argument overrides).
    Models, weights, fusion and the ensembles' public tensors are left as they are. Returns the models tuned.
    Raises ValueError where the repository cannot take it."""
    from .repository import merge_image_decoding, set_parameters

    profile = load_profile(profile) if isinstance(profile, str) else profile
    decoding = decoding or profile.decoding
    if decoding not in DECODING:
        raise ValueError(f"decoding must be one of {', '.join(DECODING)}, not {decoding!r}")
    repository = Path(repository)
    tuned = [m for m in profile.models if (repository / m / "config.pbtxt").is_file()]
    merge = (decoding == "in_encoder" and "image_preprocess" in tuned and "image_encoder" in tuned)
    for model in tuned:
        tuning = profile.models[model]
        if model == "image_preprocess" and merge:
            continue  # its settings go to the encoder, below
        notes = [tuning.why]
        if model == "image_encoder" and merge:
            pre = profile.models["image_preprocess"]
            notes.append(f"decoding (image_preprocess folded in): {pre.why}")
            tuning = Tuning(tuning.kind, tuning.count, tuning.preferred, tuning.delay_us,
                            {**pre.params, **tuning.params}, tuning.why)
        _write_tuning(repository, model, tuning, profile.name, notes)
    for model, values in (extra_params or {}).items():
        set_parameters(repository, model, values)
    if merge:
        merge_image_decoding(repository)
    return tuned
