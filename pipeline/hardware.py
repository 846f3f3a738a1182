"""Probe the machine: NVIDIA GPUs through NVML (nvidia-ml-py), else the CPU.

The probe is plain data (a dataclass) so the planner and the tests can use made-up hardware.
"""
from __future__ import annotations

import os
import platform
import shutil
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

# Dense bf16 peaks (no 2:4 sparsity) from ../shared/docs/field-facts.md, matched by name.
DENSE_BF16_PEAK = [("H200", 989e12), ("H100 PCIe", 756e12), ("H100", 989e12), ("A100", 312e12),
                   ("L40S", 362e12), ("A10G", 70e12), ("RTX 4090", 165e12), ("RTX 3090", 71e12),
                   ("L4", 121e12), ("T4", 65e12), ("V100", 125e12)]


@dataclass
class GPU:
    name: str
    memory_bytes: int
    compute_capability: tuple[int, int] | None = None


@dataclass
class Hardware:
    kind: str                        # "cuda" or "cpu"
    gpus: list[GPU] = field(default_factory=list)
    cpu_name: str = ""
    cpu_cores: int = 1
    ram_bytes: int = 0
    cpu_bf16: bool = False           # bf16 in hardware: `train.precision: auto` is bf16 autocast on this CPU
    python: str = platform.python_version()

    @property
    def device(self) -> str:
        return "cuda" if self.kind == "cuda" else "cpu"

    @property
    def name(self) -> str:
        return self.gpus[0].name if self.gpus else f"{self.cpu_name or 'CPU'} ({self.cpu_cores} cores)"

    @property
    def auto_precision(self) -> str:
        """What `train.precision: auto` computes in here (the engine's `autocast_dtype`), for the logs."""
        if self.gpus:
            cc = self.gpus[0].compute_capability
            return "fp16" if cc is not None and cc[0] < 8 else "bf16"  # bf16 from Ampere (8.0) on
        return "bf16" if self.cpu_bf16 else "fp32"

    @property
    def memory_bytes(self) -> int:
        """Memory one training process may use: one GPU's memory, or the machine's RAM."""
        return self.gpus[0].memory_bytes if self.gpus else self.ram_bytes

    @property
    def peak_flops(self) -> float | None:
        """Dense bf16 peak of one GPU; None on CPU (no meaningful published peak, no MFU)."""
        return dense_peak(self.gpus[0].name) if self.gpus else None

    def to_dict(self) -> dict:
        return asdict(self)


def dense_peak(gpu_name: str) -> float | None:
    for key, peak in DENSE_BF16_PEAK:
        if key.lower() in gpu_name.lower():
            return peak
    return None


def nvml_gpus() -> list[GPU]:
    try:
        import pynvml  # provided by nvidia-ml-py

        pynvml.nvmlInit()
    except Exception:  # no library, no driver: this is a CPU machine
        return []
    try:
        gpus = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            name = pynvml.nvmlDeviceGetName(h)
            name = name.decode() if isinstance(name, bytes) else name
            mem = pynvml.nvmlDeviceGetMemoryInfo(h)
            try:
                cc = tuple(pynvml.nvmlDeviceGetCudaComputeCapability(h))
            except pynvml.NVMLError:
                cc = None
            gpus.append(GPU(name=name, memory_bytes=int(mem.total), compute_capability=cc))
        return gpus
    finally:
        pynvml.nvmlShutdown()


def cpu_bf16_switched_off() -> bool:
    """PUFFERFISH_CPU_BF16=0: treat this CPU as one without bf16 (see `cpu_has_native_bf16`)."""
    return os.environ.get("PUFFERFISH_CPU_BF16", "").strip() == "0"


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 in hardware (AVX512-BF16 or AMX, as PyTorch's cpuinfo
    reports). There oneDNN's bf16 matmuls ran 2.0-3.4x the fp32 rate on a 2-core EPYC (Zen 4),
    and the engine's step 1.2-1.3x eager, 1.5-1.75x compiled (benchmarks/notes/cpu_precision.md);
    elsewhere bf16 is converted in software, not measured here, so `auto` stays fp32.
    PUFFERFISH_CPU_BF16=0 answers no on any CPU: `auto` trains fp32 everywhere, trials and full
    run alike, so one machine can measure what an fp32-only CPU would choose."""
    import torch

    if cpu_bf16_switched_off():
        return False
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # private, hence the guard
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _ram_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 8 << 30


def probe() -> Hardware:
    import torch

    gpus = nvml_gpus() if torch.cuda.is_available() else []
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return Hardware(kind="cuda" if gpus else "cpu", gpus=gpus, cpu_name=_cpu_name(),
                    cpu_cores=cores, ram_bytes=_ram_bytes(), cpu_bf16=cpu_has_native_bf16())


def system_checks(folders: list[Path], min_free_bytes: int = 1 << 30) -> list[str]:
    """Problems that would stop a run later: old Python, a nearly full disk."""
    problems = []
    if sys.version_info < (3, 11):
        problems.append(f"Python {platform.python_version()} is too old; use 3.11 or newer")
    for folder in folders:
        folder = Path(folder)
        probe_dir = folder if folder.exists() else next((p for p in folder.parents if p.exists()), Path("/"))
        free = shutil.disk_usage(probe_dir).free
        if free < min_free_bytes:
            problems.append(f"only {free / 2**30:.1f} GiB free at {probe_dir}; free some disk space")
    return problems
