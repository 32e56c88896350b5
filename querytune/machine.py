"""What this machine is, for the speed figures that name it: the CPU or accelerator, torch's threads and version."""

from __future__ import annotations

import platform
from pathlib import Path


def cpu_model() -> str:
    """The CPU's model name (as `lscpu` gives it): every speed figure names it, hosts differ."""
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.is_file() else []
    return (
        next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), "")
        or platform.processor()
        or "cpu"
    )


def hardware() -> str:
    """What a speed measurement depends on: the accelerator or CPU model, the threads torch uses, torch's version."""
    import torch

    name = torch.cuda.get_device_name() if torch.cuda.is_available() else cpu_model()
    return f"{name}, {torch.get_num_threads()} threads, torch {torch.__version__}"
