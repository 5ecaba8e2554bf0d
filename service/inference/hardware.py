"""Whether the CPU computes bfloat16 natively, and the start-up warning when it does not.

On a CPU without bf16 instructions (AVX2-only x86, older Arm), PyTorch emulates bf16
matmuls: ``--dtype bfloat16`` then runs about 6x slower than float32, and the start-up
warm-up of LLaVE-0.5B took 339 s on such a machine. ``auto`` already picks float32 on CPU
(``model/checkpoint.py``, ``resolve_dtype``); this module only explains an explicit choice
that hurts. Nothing here imports torch: the flags come from ``/proc/cpuinfo``, and torch's own
query is asked only where that file is missing and torch is already loaded.
"""

from __future__ import annotations

import sys
from pathlib import Path

# x86 (/proc/cpuinfo "flags"): AVX-512 BF16 and AMX BF16; Arm ("Features"): the BF16 extension.
BF16_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")
CPUINFO = Path("/proc/cpuinfo")


def cpu_flags(cpuinfo: str | None = None) -> set[str] | None:
    """The CPU's feature flags from ``/proc/cpuinfo`` (or the given text); None if unknown."""
    if cpuinfo is None:
        try:
            cpuinfo = CPUINFO.read_text(errors="replace")
        except OSError:
            return None
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip().lower() in ("flags", "features"):
            return set(value.split())
    return None


def native_bf16(cpuinfo: str | None = None) -> tuple[bool | None, str]:
    """(whether the CPU has bf16 instructions, how that was found); None when unknown."""
    flags = cpu_flags(cpuinfo)
    if flags is not None:
        found = [flag for flag in BF16_FLAGS if flag in flags]
        if found:
            return True, "/proc/cpuinfo lists " + ", ".join(found)
        return False, "/proc/cpuinfo lists none of " + ", ".join(BF16_FLAGS)
    torch = sys.modules.get("torch")  # asked only when already loaded: importing it is slow
    query = getattr(getattr(torch, "cpu", None), "_is_avx512_bf16_supported", None)
    if query is not None:
        try:
            supported = bool(query())
        except Exception:
            return None, "unknown"
        return supported, "torch reports " + ("" if supported else "no ") + "AVX-512 BF16 support"
    return None, "unknown"


def dtype_warning(device: str, dtype: str, cpuinfo: str | None = None) -> str | None:
    """A warning for serving ``dtype`` on ``device`` when the CPU would emulate it, else None."""
    if not str(device).startswith("cpu") or str(dtype).removeprefix("torch.") != "bfloat16":
        return None
    native, how = native_bf16(cpuinfo)
    if native is not False:
        return None
    return (
        f"dtype bfloat16 on a CPU without native bf16 instructions ({how}): PyTorch emulates "
        "it, about 6x slower than float32 (a 339 s warm-up was measured on an AVX2-only CPU). "
        "Serve with --dtype float32, or auto, which picks float32 on CPU."
    )


# --- which devices get an engine -----------------------------------------------------------


def cuda_device_count() -> int:
    """CUDA devices this process may use (``CUDA_VISIBLE_DEVICES`` applies).

    torch is imported only where an NVIDIA driver is installed: on a CPU-only host the
    answer is 0 without the second or two that importing it costs. Counting devices does
    not create a CUDA context (the engines, spawned, create their own)."""
    if not (Path("/proc/driver/nvidia").exists() or Path("/dev/nvidiactl").exists()):
        return 0
    try:
        import torch
    except ImportError:
        return 0
    try:
        return int(torch.cuda.device_count()) if torch.cuda.is_available() else 0
    except Exception:  # a broken driver: serve on the CPU rather than not at all
        return 0


def parse_devices(spec: str) -> list[str] | int | None:
    """``--devices``: None for ``auto``, a count, or the list of device names (checked)."""
    text = spec.strip().lower()
    if text == "auto":
        return None
    if text.isdigit():
        count = int(text)
        if count < 1:
            raise ValueError("devices: a count must be at least 1")
        return count
    names = [part.strip() for part in text.split(",") if part.strip()]
    if not names:
        raise ValueError("devices: give auto, a count, or a list such as cuda:0,cuda:1")
    for name in names:
        kind, _, index = name.partition(":")
        if kind not in ("cpu", "cuda") or (index and not index.isdigit()) or (kind == "cpu" and index):
            raise ValueError(f"devices: {name!r} is not a device (cpu, cuda or cuda:N)")
    return names


def resolve_devices(spec: str, cuda_count: int | None = None) -> list[str]:
    """One device name per engine for a ``--devices`` value.

    ``auto``: every visible CUDA device, else the CPU. ``N``: the first N CUDA devices; on a
    host without CUDA, N engines on the CPU (replicas sharing its cores). A list is taken
    as given (``cuda`` alone means ``cuda:0``)."""
    parsed = parse_devices(spec)
    if isinstance(parsed, list):
        return ["cuda:0" if name == "cuda" else name for name in parsed]
    visible = cuda_device_count() if cuda_count is None else cuda_count
    if parsed is None:
        return [f"cuda:{i}" for i in range(visible)] or ["cpu"]
    if visible == 0:
        return ["cpu"] * parsed
    if parsed > visible:
        raise ValueError(f"devices: {parsed} engines asked for, but {visible} CUDA device(s) are visible")
    return [f"cuda:{i}" for i in range(parsed)]
