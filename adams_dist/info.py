"""What this machine offers adams_dist: torch, devices, backends, and the kernel path of each rule."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from .version import __version__


def cpu_name() -> str:
    """The CPU model (Linux /proc/cpuinfo), else what ``platform`` knows, else "unknown"."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def info() -> dict[str, Any]:
    from .optimizers import OPTIMIZERS
    from .rules import compile_supported
    from .runtime import pick_device

    device = pick_device(int(os.environ.get("LOCAL_RANK", 0)))

    cuda = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    mps = bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())
    backends = {}
    if dist.is_available():
        backends = {"gloo": dist.is_gloo_available(), "nccl": dist.is_nccl_available(), "mpi": dist.is_mpi_available()}
    launched = "WORLD_SIZE" in os.environ
    return {
        "adams_dist": __version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": cpu_name(),
        "devices": {"cpu": True, "cuda": cuda, "mps": mps},
        "distributed_backends": backends,
        "default_device": str(device),
        "torch_compile_cpu": compile_supported(torch.device("cpu")),
        "triton_cuda": torch.cuda.is_available() and compile_supported(torch.device("cuda")),
        "kernel_path (kernel='auto', default device)": {
            name: cls.rule.kernel_path(device) for name, cls in OPTIMIZERS.items()
        },
        "launched": launched,
        "world_size": int(os.environ.get("WORLD_SIZE", 1)),
        "rank": int(os.environ.get("RANK", 0)),
    }


def format_info(data: dict[str, Any]) -> str:
    lines = []
    for key, value in data.items():
        if isinstance(value, dict):
            lines.append(f"{key}:")
            lines.extend(f"  {k}: {v}" for k, v in value.items())
        else:
            lines.append(f"{key}: {value}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m adams_dist", description="adams_dist utilities")
    sub = parser.add_subparsers(dest="command", required=True)
    p_info = sub.add_parser("info", help="torch, devices, backends and kernel paths")
    p_info.add_argument("--json", action="store_true", help="machine-readable output")
    args = parser.parse_args(argv)
    data = info()
    print(json.dumps(data, indent=2) if args.json else format_info(data))
    return 0
