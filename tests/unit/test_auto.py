"""`auto`: the hardware class from recorded CPU flags, and what is chosen for each class (no server, no speed)."""
from __future__ import annotations

from pathlib import Path

import pytest

from mmfuse.auto import Hardware, choose, detect
from mmfuse.cli import main
from mmfuse.profiles import load_profile, with_precision
from mmfuse.repository import load_config, parameters
from mmfuse.serving import hardware
from mmfuse.serving.openclip_models import ClipSpec
from mmfuse.serving.params import ModelContext, Params

CPUINFO = Path(__file__).parent / "cpuinfo"
CLASSES = {  # recorded /proc/cpuinfo -> (class, precision auto picks, bf16 units)
    "amx-xeon-dev-machine.txt": ("amx", "bf16", True),
    "avx512-bf16-epyc-zen4.txt": ("avx512-bf16", "bf16", True),
    "avx512-xeon-ice-lake.txt": ("avx512", "fp32", False),
    "avx2-epyc-zen2.txt": ("avx2", "fp32", False),
    "generic-arm64-neoverse-n1.txt": ("generic", "fp32", False),
}
GIB = 2**30


def machine(name: str, cores: int = 2, memory_gib: float = 24, gpus: tuple[str, ...] = (), openvino: bool = True,
            nncf: bool = True) -> Hardware:
    cpu, flags = hardware.cpu_model_and_flags(CPUINFO / name)
    return Hardware(cpu, flags, cores, int(memory_gib * GIB), gpus, openvino=openvino, nncf=nncf)


@pytest.mark.parametrize("name", sorted(CLASSES))
def test_the_class_and_the_precision_from_recorded_flags(name):
    cpu_class, precision, bf16 = CLASSES[name]
    hw = machine(name)
    assert hw.cpu_class == cpu_class and hw.hardware_class == f"cpu-{cpu_class}" and hw.bf16_units is bf16
    assert hardware.resolve_precision("auto", "CPU", hw.flags) == precision
    assert hardware.resolve_precision("auto", "GPU", hw.flags) == "fp16"
    assert hardware.resolve_precision("int8", "CPU", hw.flags) == "int8"  # only auto is resolved


@pytest.mark.parametrize("name", sorted(CLASSES))
@pytest.mark.parametrize("goal", ["throughput", "latency"])
def test_auto_never_picks_bf16_without_bf16_units(name, goal):
    cpu_class, precision, _ = CLASSES[name]
    choice = choose(machine(name), goal)
    for model in ("image_encoder", "text_encoder"):
        tuning = choice.profile.models[model]
        assert tuning.kind == "KIND_CPU"
        assert tuning.params["precision"] == precision
        assert tuning.params["engine"] == ("torch" if cpu_class == "generic" else "openvino")
    assert choice.base == {"generic": "baseline"}.get(cpu_class, "cpu" if goal == "throughput" else "latency")


@pytest.mark.parametrize("cores,memory_gib,instances,threads", [
    (2, 24, 2, 1),     # one single-thread instance per core
    (16, 128, 8, 2),   # at most 8 instances; the other cores as threads
    (16, 6, 4, 4),     # one instance per 1.5 GiB of memory
    (1, 2, 1, 1),
])
def test_throughput_instances_and_threads_follow_cores_and_memory(cores, memory_gib, instances, threads):
    choice = choose(machine("avx2-epyc-zen2.txt", cores, memory_gib), "throughput")
    for model in ("image_encoder", "text_encoder"):
        tuning = choice.profile.models[model]
        assert (tuning.count, tuning.params["torch_threads"]) == (instances, str(threads))
    assert choice.profile.decoding == "in_encoder"


def test_latency_is_one_instance_on_every_core():
    choice = choose(machine("amx-xeon-dev-machine.txt", cores=12), "latency")
    tuning = choice.profile.models["image_encoder"]
    assert (tuning.count, tuning.params["torch_threads"], tuning.delay_us) == (1, "12", 0)


def test_a_gpu_gets_the_gpu_profile_with_decoders_sized_to_the_host():
    choice = choose(machine("avx2-epyc-zen2.txt", cores=32, gpus=("NVIDIA H100 80GB HBM3",)), "throughput")
    assert choice.hardware.hardware_class == "gpu" and choice.base == "gpu"
    models = choice.profile.models
    assert models["image_encoder"].kind == models["text_encoder"].kind == "KIND_GPU"
    assert models["image_encoder"].params["precision"] == "fp16" and models["image_encoder"].params["engine"] == "torch"
    assert models["image_preprocess"].count == 4 and models["image_preprocess"].params["decode_threads"] == "8"
    with pytest.raises(ValueError, match="int8"):
        choose(choice.hardware, "throughput", "int8")


def test_without_openvino_the_engine_is_torch():
    choice = choose(machine("amx-xeon-dev-machine.txt", openvino=False), "throughput")
    assert choice.profile.models["image_encoder"].params["engine"] == "torch"
    assert any("not installed" in r for r in choice.reasons)


def test_precision_overrides():
    avx2 = machine("avx2-epyc-zen2.txt")
    int8 = choose(avx2, "throughput", "int8").profile.models["text_encoder"].params
    assert int8["precision"] == "int8" and int8["engine"] == "openvino"
    with pytest.raises(ValueError, match="no bf16 units"):
        choose(avx2, "throughput", "bf16")
    with pytest.raises(ValueError, match="nncf"):
        choose(machine("avx2-epyc-zen2.txt", nncf=False), "throughput", "int8")
    with pytest.raises(ValueError, match="CUDA"):
        choose(avx2, "throughput", "fp16")
    named = with_precision(load_profile("baseline"), "int8").models["image_encoder"].params
    assert named["precision"] == "int8" and named["engine"] == "openvino"
    with pytest.raises(ValueError, match="KIND_GPU"):
        with_precision(load_profile("gpu"), "int8")


def test_the_hand_picked_cpu_profiles_resolve_precision_on_the_machine_that_serves():
    for name in ("cpu", "latency"):
        for model in ("image_encoder", "text_encoder"):
            assert load_profile(name).models[model].params["precision"] == "auto"
    raw = {"model_name": "mmfuse-tiny", "allow_random_init": "true", "precision": "auto"}
    spec = ClipSpec.from_params(Params("image_encoder", raw), ModelContext("image_encoder", None))
    assert spec.precision == hardware.resolve_precision("auto", "CPU")


def test_detect_reads_this_machine():
    hw = detect(cuda=False)
    assert hw.cores >= 1 and hw.hardware_class.startswith("cpu-")
    assert hw.as_dict()["class"] == hw.hardware_class and hw.describe().startswith(hw.hardware_class)


def test_apply_profile_defaults_to_auto_and_says_what_it_chose(tmp_path, capsys):
    out = tmp_path / "auto"
    assert main(["apply-profile", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    hw = detect(cuda=False)
    assert f"hardware: {hw.hardware_class}" in printed and "auto (throughput)" in printed
    values = parameters(load_config(out, "image_encoder"))
    assert values["precision"] == hardware.resolve_precision("auto", "CPU")
    chosen = choose(hw, "throughput").profile.models["image_encoder"]
    assert load_config(out, "image_encoder").instance_group[0].count == chosen.count
    assert "auto on cpu-" in (out / "image_encoder" / "config.pbtxt").read_text()  # the reason, in the file


def test_an_impossible_precision_is_refused_before_anything_is_written(tmp_path, capsys):
    out = tmp_path / "x"
    assert main(["apply-profile", "gpu", "--precision", "int8", "--out", str(out)]) == 2
    assert "int8" in capsys.readouterr().err and not out.exists()


def test_mmfuse_cpu_flags_makes_this_machine_pass_for_another_class(monkeypatch):
    """$MMFUSE_CPU_FLAGS replaces this CPU's flags (the model name stays this CPU's): auto then chooses, and the
    handlers resolve precision auto, as on that class; the bench labels the run as emulated."""
    for name in (hardware.FLAGS_ENV, *hardware.ISA_LIMITS_ENV):
        monkeypatch.delenv(name, raising=False)
    real_model, _ = hardware.cpu_model_and_flags()
    _, avx2 = hardware.cpu_model_and_flags(CPUINFO / "avx2-epyc-zen2.txt")
    monkeypatch.setenv("MMFUSE_CPU_FLAGS", " ".join(sorted(avx2)))
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "avx2")
    model, flags = hardware.cpu_model_and_flags()
    assert model == real_model and flags == avx2
    hw = detect(cuda=False)
    assert hw.hardware_class == "cpu-avx2"
    assert choose(hw).profile.models["image_encoder"].params["precision"] == "fp32"
    assert hardware.emulation() == {"MMFUSE_CPU_FLAGS": " ".join(sorted(avx2)), "ONEDNN_MAX_CPU_ISA": "AVX2",
                                    "ATEN_CPU_CAPABILITY": "avx2"}
    assert hardware.cpu_model_and_flags(CPUINFO / "amx-xeon-dev-machine.txt")[1] != avx2  # a file is read as it is
    monkeypatch.delenv("MMFUSE_CPU_FLAGS")
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA")
    monkeypatch.delenv("ATEN_CPU_CAPABILITY")
    assert hardware.emulation() == {}


def test_bf16_is_refused_in_any_profile_without_bf16_units(monkeypatch):
    _, avx2 = hardware.cpu_model_and_flags(CPUINFO / "avx2-epyc-zen2.txt")
    monkeypatch.setenv("MMFUSE_CPU_FLAGS", " ".join(sorted(avx2)))
    for name in ("cpu", "latency", "baseline"):
        with pytest.raises(ValueError, match="without bf16 units"):
            with_precision(load_profile(name), "bf16")
        assert with_precision(load_profile(name), "fp32").models["image_encoder"].params["precision"] == "fp32"
    gpu = with_precision(load_profile("gpu"), "bf16")  # KIND_GPU: the device's units, not the CPU's
    assert gpu.models["image_encoder"].params["precision"] == "bf16"
    _, amx = hardware.cpu_model_and_flags(CPUINFO / "amx-xeon-dev-machine.txt")
    monkeypatch.setenv("MMFUSE_CPU_FLAGS", " ".join(sorted(amx)))
    assert with_precision(load_profile("cpu"), "bf16").models["text_encoder"].params["precision"] == "bf16"
