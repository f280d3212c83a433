"""``auto``: detect the machine and pick the serving settings for it, from the profiles' data.

``detect()`` reads the hardware (CPU flags, usable cores, memory, CUDA devices, which engines are installed);
``choose(hardware, goal)`` turns it into a concrete ``Profile``: the hardware class's base profile for the
goal (``throughput``: ``cpu`` or ``gpu``; ``latency``: ``latency`` on a CPU), then the class's engine and
precision (never bf16 without bf16 units), and instances and threads sized to the cores and the memory. The
rules are data (mmfuse/profiles/auto/rules.json, one reason per choice); this module applies them and
nothing else, so the choice for every class is a unit test on recorded CPU flags.

The two virtual profile names ``auto`` (throughput) and ``auto-latency`` resolve here (``mmfuse.profiles``).
"""
from __future__ import annotations

import importlib.util
import json
import platform
from dataclasses import dataclass, replace
from functools import cache
from pathlib import Path
from typing import Any

from .profiles import PROFILE_DIR, Profile, Tuning, load_profile
from .serving import hardware

RULES_FILE = PROFILE_DIR / "auto" / "rules.json"
GOALS = ("throughput", "latency")
VIRTUAL = {"auto": "throughput", "auto-latency": "latency"}
ENCODERS = ("image_encoder", "text_encoder")


@dataclass(frozen=True)
class Hardware:
    cpu: str | None
    flags: frozenset[str]
    cores: int
    memory_bytes: int | None = None
    gpus: tuple[str, ...] = ()  # CUDA device names
    openvino: bool = True  # engine openvino installed (and x86)
    nncf: bool = False  # precision int8 possible

    @property
    def cpu_class(self) -> str:
        return hardware.cpu_class(self.flags)

    @property
    def hardware_class(self) -> str:
        return "gpu" if self.gpus else f"cpu-{self.cpu_class}"

    @property
    def bf16_units(self) -> bool:
        return hardware.has_bf16_units(self.flags)

    def describe(self) -> str:
        memory = f", {self.memory_bytes / 2**30:.0f} GiB" if self.memory_bytes else ""
        shown = [f for f in hardware.REPORTED_FLAGS if f in self.flags]
        gpus = f", GPU: {', '.join(self.gpus)}" if self.gpus else ""
        return (f"{self.hardware_class}: {self.cpu or 'unknown CPU'} ({self.cores} cores{memory}; "
                f"{' '.join(shown) or 'no AVX2'}){gpus}")

    def as_dict(self) -> dict[str, Any]:
        return {"class": self.hardware_class, "cpu": self.cpu, "cores": self.cores, "memory_bytes": self.memory_bytes,
                "flags": [f for f in hardware.REPORTED_FLAGS if f in self.flags], "bf16_units": self.bf16_units,
                "gpus": list(self.gpus), "openvino": self.openvino, "nncf": self.nncf}


def detect(cuda: bool = True) -> Hardware:
    """This machine. ``cuda`` False skips asking torch for CUDA devices (it imports torch)."""
    cpu, flags = hardware.cpu_model_and_flags()
    gpus: tuple[str, ...] = ()
    if cuda:
        try:
            import torch

            if torch.cuda.is_available():
                gpus = tuple(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
        except Exception:  # noqa: BLE001 - no torch, or a broken CUDA set-up: a CPU machine
            gpus = ()
    x86 = platform.machine().lower() in ("x86_64", "amd64")
    return Hardware(cpu, flags, hardware.usable_cores(), hardware.memory_bytes(), gpus,
                    openvino=x86 and importlib.util.find_spec("openvino") is not None,
                    nncf=importlib.util.find_spec("nncf") is not None)


@cache
def rules() -> dict[str, Any]:
    data = json.loads(Path(RULES_FILE).read_text())
    for name, rule in data["classes"].items():
        missing = {"throughput", "latency", "precision", "engine", "why"} - set(rule)
        if missing:
            raise ValueError(f"{RULES_FILE}: class {name!r} lacks {', '.join(sorted(missing))}")
    return data


@dataclass(frozen=True)
class Choice:
    hardware: Hardware
    goal: str
    base: str  # the profile the choice starts from
    profile: Profile
    reasons: tuple[str, ...]

    def summary(self) -> dict[str, Any]:
        encoders = {m: {"instances": t.count, **{k: t.params[k] for k in ("engine", "precision", "torch_threads")
                                                  if k in t.params}}
                    for m, t in self.profile.models.items() if m in ENCODERS}
        return {"hardware": self.hardware.as_dict(), "goal": self.goal, "base_profile": self.base,
                "decoding": self.profile.decoding, "encoders": encoders, "reasons": list(self.reasons)}

    def lines(self) -> list[str]:
        out = [f"hardware: {self.hardware.describe()}",
               f"auto ({self.goal}): profile {self.base!r} adapted, decoding {self.profile.decoding}"]
        for model, entry in self.summary()["encoders"].items():
            out.append(f"  {model}: {entry['instances']} instance(s) x {entry.get('torch_threads', '0')} thread(s), "
                       f"{entry.get('engine', 'torch')}, {entry.get('precision', 'fp32')}")
        out += [f"  why: {r}" for r in self.reasons]
        return out


def choose(hw: Hardware, goal: str = "throughput", precision: str | None = None) -> Choice:
    """The settings for ``hw`` and ``goal``; ``precision`` overrides the class's (int8 needs engine openvino)."""
    if goal not in GOALS:
        raise ValueError(f"goal must be one of {', '.join(GOALS)}, not {goal!r}")
    data = rules()
    rule = data["classes"][hw.hardware_class]
    base_name = rule[goal]
    base = load_profile(base_name)
    engine = rule["engine"] if (rule["engine"] != "openvino" or hw.openvino) else "torch"
    chosen = precision or rule["precision"]
    reasons = [rule["why"]]
    if engine != rule["engine"]:
        reasons.append("OpenVINO is not installed here: engine torch")
    if chosen == "bf16" and not hw.bf16_units and not hw.gpus:
        raise ValueError(f"precision bf16 on {hw.describe()}: no bf16 units, it would be emulated (~10x slower than "
                         "fp32); choose fp32 or int8")
    if chosen == "int8":
        if hw.gpus:
            raise ValueError("precision int8 runs on OpenVINO's CPU plugin; a GPU serves fp16 (the default)")
        if not hw.openvino or not hw.nncf:
            raise ValueError("precision int8 needs openvino and nncf installed (scripts/setup.sh installs both)")
        engine = "openvino"
        reasons.append("int8 asked for: NNCF post-training quantisation, checked against fp32 at load")
    if chosen == "fp16" and not hw.gpus:
        raise ValueError("precision fp16 needs a CUDA device (KIND_GPU)")
    models = dict(base.models)
    if hw.gpus:
        decoders = max(1, hw.cores // data["gpu_host"]["cores_per_decoder"])
        threads = max(1, min(data["gpu_host"]["cores_per_decoder"], hw.cores))
        pre = models["image_preprocess"]
        models["image_preprocess"] = replace(pre, count=decoders, params={**pre.params, "decode_threads": str(threads)})
        reasons.append(data["gpu_host"]["why"] + f": {decoders} x {threads} threads here")
        for model in ENCODERS:
            tuning = models[model]
            models[model] = replace(tuning, params={**tuning.params, "precision": chosen, "engine": engine},
                                    why=f"auto on gpu: {engine} {chosen}; base: {tuning.why}")
    else:
        cpu = data["cpu"]
        if goal == "latency":
            count, threads = 1, hw.cores
        else:
            by_memory = int((hw.memory_bytes or 0) / 2**30 / cpu["memory_per_instance_gib"]) if hw.memory_bytes else 0
            count = max(1, min(hw.cores, cpu["max_instances"], by_memory or hw.cores))
            threads = max(1, hw.cores // count)
        reasons.append(cpu[f"{goal}_why"] + f": {count} instance(s) x {threads} thread(s) per encoder on {hw.cores} cores")
        for model in ENCODERS:
            if model in models:
                tuning = models[model]
                models[model] = _cpu_tuning(tuning, count, threads, chosen, engine, hw.hardware_class)
    name = next(k for k, v in VIRTUAL.items() if v == goal)
    profile = Profile(name, f"auto for {hw.describe()}, from profile {base_name!r}", base.decoding,
                      base.route_sequences, models)
    return Choice(hw, goal, base_name, profile, tuple(reasons))


def _cpu_tuning(tuning: Tuning, count: int, threads: int, precision: str, engine: str, where: str) -> Tuning:
    params = {**tuning.params, "precision": precision, "engine": engine, "torch_threads": str(threads)}
    why = f"auto on {where}: {count} instance(s) x {threads} thread(s), {engine} {precision}; base: {tuning.why}"
    return replace(tuning, kind="KIND_CPU", count=count, params=params, why=why)


def resolve(name: str, precision: str | None = None, hw: Hardware | None = None) -> Choice:
    """The choice behind a virtual profile name (``auto``, ``auto-latency``) on ``hw`` (default: detected)."""
    return choose(hw or detect(), VIRTUAL[name], precision)
