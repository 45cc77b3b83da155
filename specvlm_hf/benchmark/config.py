"""`BenchmarkConfig`: what one benchmark run measures, on which models and prompts (the `bench` flags)."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field, fields

import torch

from ..configuration import SpeculativeConfig
from .methods import check_method_names

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_tree(spec: str) -> SpeculativeConfig | None:
    """`"search"` -> `None` (the `-fixed` methods' tree is searched for per temperature on this device, before the
    timed runs); `"D,K,N"` -> `SpeculativeConfig(depth=D, top_k=K, total_tokens=N)`. The earlier spelling `"auto"`
    means `"search"`, with a `FutureWarning` (the auto tree is the draft's online controller, `-auto` methods)."""
    if spec == "auto":
        warnings.warn("--tree auto is now --tree search", FutureWarning, stacklevel=2)
        spec = "search"
    if spec == "search":
        return None
    parts = spec.split(",")
    try:
        depth, top_k, total_tokens = (int(p) for p in parts)
    except ValueError:
        raise ValueError(f"--tree must be 'search' or 'DEPTH,TOP_K,TOTAL_TOKENS' (e.g. 5,10,60), got {spec!r}") from None
    return SpeculativeConfig(depth=depth, top_k=top_k, total_tokens=total_tokens)


@dataclass(frozen=True)
class BenchmarkConfig:
    """
    Args:
        methods (`tuple[str, ...]`, *optional*): methods to compare (`methods.METHOD_NAMES`); "vanilla" is always
            added. Without it, every method that applies to the target (`runner.applicable_methods`): on a testbed
            the ones with a shipped (or given) draft and assistant, elsewhere all of them, but the compressor's on a
            target whose visual tokens form no patch grid.
        target (`str`): "testbed" (the LLaVA testbed), "testbed-qwen2-vl" or a directory with a checkpoint of a
            supported architecture and its processor.
        target_adapter (`str`, *optional*): a peft adapter folder applied to the target (every method decodes the
            adapted target; a draft may be a LoRA adapter folder of a draft, `lora.py`).
        draft (`str`, *optional*): directory of a trained `SpecVLMDraftModel`; without it a randomly initialised draft
            runs (low acceptance; the JSON says so).
        specvlm_draft (`str`, *optional*): directory of a trained draft with an elastic visual compressor, for the
            `specvlm` method; default the shipped one on the shipped testbed, else a random draft with SpecVLM's
            compressor.
        eagle3_draft (`str`, *optional*): directory of a trained EAGLE-3 draft (`SpecVLMEagle3DraftModel`) for the
            `eagle3` methods; default the shipped one on the shipped testbed, else a random one.
        parallel_draft (`str`, *optional*): directory of a trained parallel draft (`SpecVLMDraftConfig.parallel_depth`
            above 1) for the `parallel` methods; default a random draft with parallel depth 6.
        assistant (`str`, *optional*): directory of the `hf-assisted` language model; by default a cached one built
            for the target's tokenizer (`assistant_lm.py`), built on first use.
        prompts (`str`, *optional*): prompt source (`prompts.load_prompts`); default the testbed's held-out set.
        image_root (`str`, *optional*): folder that JSONL image paths are relative to.
        kind (`str`, *optional*): keep only prompts of this kind ("short" / "long").
        num_samples (`int`): prompts benchmarked (mixed round-robin across kinds).
        repeats (`int`): timed runs per method and sample.
        max_new_tokens (`int`): generation budget of every run.
        temperatures (`tuple[float, ...]`): 0 = greedy; > 0 samples (the same seed per sample for every method).
        batch_sizes (`tuple[int, ...]`): 1 = one prompt per call (the per-sample sweep); B > 1 also decodes the
            prompts in left-padded batches of B rows (`batches.py`), vanilla and the tree-loop methods only.
        tree (`str`): the `-fixed` methods' tree: "search" (searched for per temperature on this device) or
            "DEPTH,TOP_K,TOTAL_TOKENS".
        draft_numerics (`str`): every draft's `SpeculativeConfig.draft_numerics`; the JSON records what "auto" chose
            and the draft level's measured cost in each numerics.
        calibration_samples (`int`), calibration_tokens (`int`), search_budget (`int`): the tree choice's prompts
            (taken after the benchmarked ones when the source has enough), tokens per calibration generation, and most
            tree shapes replayed per temperature.
        prompt_lookup_tokens (`int`): candidate length of `prompt-lookup`.
        warmup_tokens (`int`): new tokens of the discarded warm-up run of each method (0 = none).
        seed (`int`): base of the per-sample seeds.
        device (`str`, *optional*): default CUDA when available, else CPU.
        dtype (`str`): "float32", "bfloat16" or "float16" (exact T = 0 equality is expected in float32).
        threads (`int`, *optional*): torch CPU threads (default: torch's).
        output (`str`, *optional*): directory for `benchmark.json` and the plots.
        rebuild_assistant (`bool`): retrain the default `hf-assisted` model even if a cached one exists.
        quick (`bool`): marks a run made from `quick_preset` (few samples, one repeat, a short calibration).
    """

    methods: tuple[str, ...] | None = field(
        default=None,
        metadata={
            "help": "Comma-separated methods to compare; without it every method that applies to the target (on a "
            "testbed, those with a shipped draft)."
        },
    )
    target: str = field(
        default="testbed",
        metadata={
            "help": "'testbed' (the LLaVA testbed), 'testbed-qwen2-vl' or a checkpoint directory (with its processor)."
        },
    )
    target_adapter: str | None = field(
        default=None,
        metadata={"help": "A peft adapter folder applied to the target (a fine-tune, e.g. a LoRA)."},
    )
    draft: str | None = field(
        default=None,
        metadata={
            "help": "Trained draft directory; default: the shipped one on the shipped testbed, else a random one."
        },
    )
    specvlm_draft: str | None = field(
        default=None,
        metadata={
            "help": "Trained draft-with-compressor directory for 'specvlm'; default: the shipped one on the shipped "
            "testbed, else a random one."
        },
    )
    eagle3_draft: str | None = field(
        default=None,
        metadata={
            "help": "Trained EAGLE-3 draft directory for 'eagle3'; default: the shipped one on the shipped testbed, "
            "else a random one."
        },
    )
    parallel_draft: str | None = field(
        default=None,
        metadata={
            "help": "Trained parallel draft directory (`specvlm-hf train --parallel-depth N`) for 'parallel-*'; "
            "default: a random draft with parallel depth 6 (with a warning)."
        },
    )
    assistant: str | None = field(
        default=None,
        metadata={
            "help": "hf-assisted model directory; default: the shipped one on the shipped testbed, else a cached "
            "one, trained on first use."
        },
    )
    prompts: str | None = field(
        default=None,
        metadata={
            "help": "JSONL file, saved dataset dir, datasets:NAME[:SPLIT], testbed-cards (the testbed's held-out "
            "digit and word cards) or testbed-text (its questions without images); without it the testbed's "
            "held-out shape scenes."
        },
    )
    image_root: str | None = field(
        default=None, metadata={"help": "Folder JSONL image paths are relative to (default: the file's)."}
    )
    kind: str | None = field(
        default=None, metadata={"help": "Only prompts of this kind (short/long); without it both, mixed."}
    )
    num_samples: int = field(default=24, metadata={"help": "Prompts benchmarked."})
    repeats: int = field(default=3, metadata={"help": "Timed runs per method and sample."})
    max_new_tokens: int = field(default=256, metadata={"help": "New tokens per generation."})
    temperatures: tuple[float, ...] = field(default=(0.0, 1.0), metadata={"help": "Comma-separated temperatures."})
    batch_sizes: tuple[int, ...] = field(
        default=(1,),
        metadata={
            "help": "Comma-separated batch sizes. 1: one prompt per call; B > 1: the prompts in left-padded batches "
            "of B rows (cycled when fewer), vanilla and the tree-loop methods (eaglevlm-*, specvlm-*, eagle3-*, "
            "parallel-*) on the same batches: tokens/s, ratio to vanilla's, sigma per row, rows equal to vanilla."
        },
    )
    tree: str = field(
        default="search",
        metadata={
            "help": "The -fixed methods' tree: 'search' (searched for on this device before the timed runs) or "
            "DEPTH,TOP_K,TOTAL_TOKENS. The -auto methods run the draft's auto tree, as generate() does."
        },
    )
    draft_numerics: str = field(
        default="auto",
        metadata={
            "help": "The drafts' kernels (SpeculativeConfig.draft_numerics): auto (the fastest measured here), "
            "reference, onednn, onednn-bf16 or int8."
        },
    )
    calibration_samples: int = field(default=2, metadata={"help": "Prompts the tree choice is calibrated on."})
    calibration_tokens: int = field(default=128, metadata={"help": "New tokens per calibration generation."})
    search_budget: int = field(default=16, metadata={"help": "Most tree shapes replayed per temperature."})
    prompt_lookup_tokens: int = field(default=10, metadata={"help": "Candidate tokens of prompt-lookup."})
    warmup_tokens: int = field(default=32, metadata={"help": "New tokens of each method's warm-up run (0: none)."})
    seed: int = field(default=0, metadata={"help": "Base seed of the per-sample seeds."})
    device: str | None = field(default=None, metadata={"help": "Device; without it cuda when available, else cpu."})
    dtype: str = field(default="float32", metadata={"help": "float32, bfloat16 or float16."})
    threads: int | None = field(default=None, metadata={"help": "torch CPU threads; without it torch's default."})
    output: str | None = field(
        default=None, metadata={"help": "Directory for benchmark.json and the PNG plots; without it the table only."}
    )
    rebuild_assistant: bool = field(default=False, metadata={"help": "Retrain the cached hf-assisted model."})
    quick: bool = field(default=False, metadata={"help": "Short run: 4 samples, 1 repeat, short calibration."})

    def __post_init__(self):
        if self.methods is not None:
            object.__setattr__(self, "methods", check_method_names(self.methods))
        object.__setattr__(self, "temperatures", tuple(float(t) for t in self.temperatures))
        object.__setattr__(self, "batch_sizes", tuple(dict.fromkeys(int(b) for b in self.batch_sizes)))
        parse_tree(self.tree)
        if self.tree == "auto":  # warned above
            object.__setattr__(self, "tree", "search")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if any(t < 0 for t in self.temperatures) or not self.temperatures:
            raise ValueError(f"temperatures must be >= 0 (and at least one), got {self.temperatures}")
        if not self.batch_sizes or min(self.batch_sizes) < 1:
            raise ValueError(f"batch_sizes must be >= 1 (and at least one), got {self.batch_sizes}")
        if self.kind not in (None, "short", "long"):
            raise ValueError(f"kind must be 'short' or 'long', got {self.kind!r}")
        for name in (
            "num_samples",
            "repeats",
            "max_new_tokens",
            "calibration_samples",
            "calibration_tokens",
            "search_budget",
            "prompt_lookup_tokens",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    @classmethod
    def quick_preset(cls, **overrides) -> BenchmarkConfig:
        """The README's main run: 4 samples (2 short, 2 long on the testbed), 1 repeat, one calibration prompt of 96
        tokens and at most 8 tree shapes replayed per temperature."""
        base = dict(
            num_samples=4, repeats=1, calibration_samples=1, calibration_tokens=96, search_budget=8, quick=True
        )
        return cls(**{**base, **overrides})

    @property
    def fixed_tree(self) -> SpeculativeConfig | None:
        return parse_tree(self.tree)

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def torch_device(self) -> torch.device:
        return torch.device(self.device or ("cuda" if torch.cuda.is_available() else "cpu"))

    @classmethod
    def field_help(cls) -> dict[str, str]:
        return {f.name: f.metadata.get("help", "") for f in fields(cls)}
