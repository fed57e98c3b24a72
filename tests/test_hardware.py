"""Hardware detection: cores, memory, and GPUs through a named nvidia-smi test double."""

from __future__ import annotations

import os
from pathlib import Path

from dspy_infra.hardware import detect_hardware, parse_meminfo, parse_nvidia_smi
from dspy_infra.models import GPUInfo

# A test double for nvidia-smi (no GPU here): it checks it was asked the documented query
# and answers in nvidia-smi's CSV format, including an "[N/A]" utilisation.
FAKE_NVIDIA_SMI = """#!/bin/sh
case "$*" in
  *"--query-gpu=index,name,memory.total,utilization.gpu"*"--format=csv,noheader,nounits"*) ;;
  *) echo "unexpected arguments: $*" >&2; exit 2 ;;
esac
echo "0, NVIDIA A100-SXM4-80GB, 81920, 37"
echo "1, NVIDIA A100-SXM4-80GB, 81920, [N/A]"
"""


def test_cores_and_memory_of_this_machine() -> None:
    info = detect_hardware()
    assert info.cpu_cores == len(os.sched_getaffinity(0))
    meminfo = Path("/proc/meminfo").read_text()
    assert info.memory_bytes == int(meminfo.split("MemTotal:")[1].split()[0]) * 1024
    assert detect_hardware() is info, "cached per process"


def test_gpus_from_a_named_nvidia_smi_test_double(tmp_path: Path) -> None:
    fake = tmp_path / "fake-nvidia-smi"
    fake.write_text(FAKE_NVIDIA_SMI)
    fake.chmod(0o755)
    info = detect_hardware(nvidia_smi=str(fake))
    assert info.gpus == (
        GPUInfo(index=0, name="NVIDIA A100-SXM4-80GB", memory_bytes=81920 << 20, utilization_percent=37.0),
        GPUInfo(index=1, name="NVIDIA A100-SXM4-80GB", memory_bytes=81920 << 20, utilization_percent=0.0),
    )


def test_failing_or_missing_nvidia_smi_means_no_gpu(tmp_path: Path) -> None:
    failing = tmp_path / "nvidia-smi-no-devices"
    failing.write_text("#!/bin/sh\necho 'No devices were found' >&2\nexit 6\n")
    failing.chmod(0o755)
    assert detect_hardware(nvidia_smi=str(failing)).gpus == ()
    assert detect_hardware(nvidia_smi=str(tmp_path / "absent")).gpus == ()


def test_parsers_ignore_noise() -> None:
    assert parse_meminfo("MemFree: 1 kB\nMemTotal:  2048 kB\n") == 2 << 20
    assert parse_meminfo("nothing here") == 0
    assert parse_nvidia_smi("garbage\n\n3, T4, 15360, 5\n") == (
        GPUInfo(index=3, name="T4", memory_bytes=15360 << 20, utilization_percent=5.0),
    )
