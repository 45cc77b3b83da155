"""Wall-clock timing that waits for the device, so that time lands in the call that spent it (used by the auto
tree's cost measurement and by the benchmark)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch


def synchronize(device: torch.device) -> None:
    """Waits for the work queued on an accelerator (`cuda`, `mps`, `xpu`, ...); nothing to wait for on the CPU."""
    if device.type != "cpu":
        getattr(torch, device.type).synchronize()


def time_call(fn: Callable[[], Any], device: torch.device) -> tuple[Any, float]:
    """`(fn(), seconds)`, the device synchronised on both sides."""
    synchronize(device)
    start = time.perf_counter()
    value = fn()
    synchronize(device)
    return value, time.perf_counter() - start
