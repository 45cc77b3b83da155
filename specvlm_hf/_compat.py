"""Version shims for the transformers 5.x range this package is tested against."""

from __future__ import annotations

import transformers
from packaging import version

TRANSFORMERS_VERSION = version.parse(transformers.__version__)
MIN_TRANSFORMERS = version.parse("5.20.0")
MAX_TRANSFORMERS = version.parse("6.0.0")  # exclusive

# 5.24 renamed the cache argument of every forward (and the output field) from `past_key_values` to `cache`.
CACHE_KWARG = "cache" if TRANSFORMERS_VERSION >= version.parse("5.24.0.dev0") else "past_key_values"


def transformers_in_tested_range() -> bool:
    return MIN_TRANSFORMERS <= TRANSFORMERS_VERSION < MAX_TRANSFORMERS
