"""Benchmark harness: speedup tau and mean accepted length sigma of this project's tree loop side by side with plain
decoding and transformers' stock speculative methods, on the same prompts in one process, with a tree budget chosen
for the current device. `specvlm-hf bench` is its command line; `run_benchmark` its entry point."""

from .config import BenchmarkConfig
from .methods import METHOD_NAMES, Method, MethodResult
from .report import BenchmarkResult
from .runner import Resources, run_benchmark

__all__ = [
    "METHOD_NAMES",
    "BenchmarkConfig",
    "BenchmarkResult",
    "Method",
    "MethodResult",
    "Resources",
    "run_benchmark",
]
