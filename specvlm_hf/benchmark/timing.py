"""Wall clock and peak memory of one call, measured the same way for every method.

Time: `time.perf_counter` around the call, the device synchronised on both sides (`clock.py`).

Peak memory of a method = bytes of the weights it uses (`module_bytes`) + the transient peak of the call:
- CUDA: `torch.cuda.max_memory_allocated` after `reset_peak_memory_stats`, minus what was allocated before.
- CPU (Linux): the kernel's resident-set high-water mark. Before the call, freed heap is returned to the OS
  (`malloc_trim`) and the mark is reset (`/proc/self/clear_refs` = 5); after it, `VmHWM - VmRSS(before)`. Nothing runs
  during the call (no sampling thread), so timing is untouched. Where the kernel does not allow the reset, the
  transient is `None` (not measured).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..clock import synchronize

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


@dataclass(frozen=True)
class Measurement:
    """A call's return value, its wall time in seconds and its transient peak memory in bytes (`None`: unknown)."""

    value: Any
    seconds: float
    transient_bytes: int | None


def _status_kib(field: str) -> int:
    return int(re.search(rf"^{field}:\s+(\d+) kB", _STATUS.read_text(), re.MULTILINE).group(1))


def _cpu_reset_supported() -> bool:
    try:
        _CLEAR_REFS.write_text("5")
        _status_kib("VmHWM")
    except (OSError, AttributeError):
        return False
    return True


class _CpuPeak:
    """Resident-set high-water mark around a call (Linux)."""

    def __init__(self):
        self.supported = _cpu_reset_supported()
        libc = ctypes.util.find_library("c")
        self._trim = getattr(ctypes.CDLL(libc), "malloc_trim", None) if libc else None

    def start(self) -> int | None:
        if not self.supported:
            return None
        if self._trim is not None:
            self._trim(0)
        _CLEAR_REFS.write_text("5")
        return _status_kib("VmRSS")

    def stop(self, before: int | None) -> int | None:
        if before is None:
            return None
        return max(0, _status_kib("VmHWM") - before) * 1024


class _CudaPeak:
    def __init__(self, device: torch.device):
        self.device = device

    def start(self) -> int:
        torch.cuda.reset_peak_memory_stats(self.device)
        return torch.cuda.memory_allocated(self.device)

    def stop(self, before: int) -> int:
        return max(0, torch.cuda.max_memory_allocated(self.device) - before)


class Meter:
    """Times calls and measures their transient peak memory on `device`."""

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self._peak = _CudaPeak(self.device) if self.device.type == "cuda" else _CpuPeak()

    @property
    def measures_memory(self) -> bool:
        return self.device.type == "cuda" or self._peak.supported

    def measure(self, fn: Callable[[], Any]) -> Measurement:
        synchronize(self.device)
        before = self._peak.start()
        start = time.perf_counter()
        value = fn()
        synchronize(self.device)
        seconds = time.perf_counter() - start
        return Measurement(value=value, seconds=seconds, transient_bytes=self._peak.stop(before))


def module_bytes(*modules: nn.Module | None) -> int:
    """Bytes of the parameters and buffers of `modules`, each tensor storage counted once (tied weights, shared
    embeddings)."""
    seen, total = set(), 0
    for module in modules:
        if module is None:
            continue
        for tensor in [*module.parameters(), *module.buffers()]:
            key = (tensor.device, tensor.untyped_storage().data_ptr())
            if key not in seen:
                seen.add(key)
                total += tensor.untyped_storage().nbytes()
    return total
