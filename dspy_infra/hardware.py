"""What this machine offers: CPU cores, memory and NVIDIA GPUs (via ``nvidia-smi``).

``detect_hardware()`` is cached per process (per ``nvidia_smi`` argument), because task
class defaults are derived from it and it shells out. Tests pass ``nvidia_smi=`` the path
of a named test-double script instead of faking GPUs through the environment.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
from pathlib import Path

from .models import GPUInfo, HardwareInfo

__all__ = ["detect_hardware", "parse_meminfo", "parse_nvidia_smi"]

_NVIDIA_QUERY = (
    "--query-gpu=index,name,memory.total,utilization.gpu",
    "--format=csv,noheader,nounits",
)
_MIB = 1 << 20


def _cpu_cores() -> int:
    # Affinity, not os.cpu_count(): a container or taskset may give us fewer cores.
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def parse_meminfo(text: str) -> int:
    """Bytes of ``MemTotal`` in a ``/proc/meminfo`` text (0 when absent)."""
    for line in text.splitlines():
        if line.startswith("MemTotal:"):
            parts = line.split()
            if len(parts) >= 2 and parts[1].isdigit():
                unit = parts[2].lower() if len(parts) > 2 else "b"
                return int(parts[1]) * (1024 if unit == "kb" else 1)
    return 0


def _memory_bytes() -> int:
    try:
        return parse_meminfo(Path("/proc/meminfo").read_text())
    except OSError:
        return 0


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        return 0.0  # nvidia-smi prints "[N/A]" for values a GPU does not report


def parse_nvidia_smi(text: str) -> tuple[GPUInfo, ...]:
    """GPUs from ``nvidia-smi --query-gpu=index,name,memory.total,utilization.gpu`` CSV."""
    gpus: list[GPUInfo] = []
    for line in text.splitlines():
        fields = [f.strip() for f in line.split(",")]
        if len(fields) < 4 or not fields[0].isdigit():
            continue
        gpus.append(
            GPUInfo(
                index=int(fields[0]),
                name=fields[1],
                memory_bytes=int(_number(fields[2]) * _MIB),
                utilization_percent=_number(fields[3]),
            )
        )
    return tuple(gpus)


def _gpus(nvidia_smi: str | None) -> tuple[GPUInfo, ...]:
    exe = nvidia_smi or shutil.which("nvidia-smi")
    if not exe:
        return ()
    try:
        proc = subprocess.run([exe, *_NVIDIA_QUERY], capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return ()
    if proc.returncode != 0:
        # Driver present but no usable GPU (e.g. "No devices were found"): treat as none.
        return ()
    return parse_nvidia_smi(proc.stdout)


@functools.cache
def detect_hardware(nvidia_smi: str | None = None) -> HardwareInfo:
    """Cores (CPU affinity), total memory and NVIDIA GPUs of this machine.

    ``nvidia_smi`` is the executable to query (default: ``nvidia-smi`` on PATH, if any).
    Blocking (it may run a subprocess): call it off the event loop, or once at startup.
    """
    return HardwareInfo(cpu_cores=_cpu_cores(), memory_bytes=_memory_bytes(), gpus=_gpus(nvidia_smi))
