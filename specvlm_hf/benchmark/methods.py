"""The decoding methods compared by the benchmark, behind one interface: `generate(target, inputs, temperature=...,
max_new_tokens=...) -> MethodResult`. Every method decodes with the same `GenerationConfig` (`generation_config`), and
target forwards are counted the same way for all of them: a hook on the target's text model records the cache length
at the start of each forward (`stats.tokens_per_forward`). Methods that decode batches (`supports_batches`) also
take a left-padded batch (`generate_rows`)."""

from __future__ import annotations

import contextlib
import copy
import logging
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from torch import nn
from transformers import GenerationConfig, LogitsProcessorList, SuppressTokensLogitsProcessor
from transformers.utils import logging as transformers_logging

from .._compat import CACHE_KWARG
from ..adapters import get_adapter
from ..configuration import SpeculativeConfig
from ..generation import speculative_generate
from ..metrics import mean_accepted_length
from .stats import tokens_per_forward


class UnknownMethodError(ValueError):
    """A method name that is not in the registry; the message lists the valid names."""


@dataclass(frozen=True)
class MethodResult:
    """
    One generation.

    Attributes:
        tokens (`list[int]`): generated token ids (prompt excluded).
        tokens_per_forward (`list[int]`): tokens emitted by each target forward, the first (prefill) included; sums
            to `len(tokens)`.
        forward_sizes (`list[int]`): tokens each target forward processed (the first one includes the prompt).
        step_time, verify_time, draft_time (`float`, *optional*): the tree loop's profile (`SpeculativeStats`).
    """

    tokens: list[int]
    tokens_per_forward: list[int]
    forward_sizes: list[int]
    step_time: float | None = None
    verify_time: float | None = None
    draft_time: float | None = None

    @property
    def new_tokens(self) -> int:
        return len(self.tokens)

    @property
    def target_forwards(self) -> int:
        return len(self.tokens_per_forward)

    @property
    def mean_accepted_length(self) -> float:
        """`metrics.mean_accepted_length` of this run (0.0 before any forward)."""
        return mean_accepted_length(self.new_tokens, self.target_forwards) or 0.0


@dataclass(frozen=True)
class RowsResult:
    """
    One generation of a left-padded batch.

    Attributes:
        tokens (`list[list[int]]`): each row's generated ids up to its end (`row_tokens`).
        target_forwards (`list[int]`): target forwards each row took part in until its end, the first (prefill)
            included; plain decoding: one per token.
    """

    tokens: list[list[int]]
    target_forwards: list[int]


def row_tokens(tokens: Sequence[int], end_tokens: Sequence[int]) -> list[int]:
    """A row's generated ids up to and including its first end token (the padding a batch adds after a finished
    row dropped); all of them when it has none."""
    for i, token in enumerate(tokens):
        if token in end_tokens:
            return list(tokens[: i + 1])
    return list(tokens)


def generation_config(target, temperature: float, max_new_tokens: int) -> GenerationConfig:
    """
    The target's generation config with exactly these settings, shared by every method: greedy at T = 0; at T > 0
    plain sampling from the tempered distribution (no top-k / top-p filtering, as EAGLE and ViSpec at T = 1).

    The image placeholder id is suppressed (`suppress_tokens`): a VLM never emits it, and it is the stock way to keep
    transformers' prompt lookup from copying a run of placeholders out of the prompt into its candidates, which makes
    LLaVA's forward fail ("Image features and image tokens do not match").
    """
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    config = copy.deepcopy(target.generation_config)
    config.max_new_tokens = max_new_tokens
    config.num_beams = 1
    if temperature == 0:
        config.do_sample = False
        config.temperature = config.top_k = config.top_p = None
    else:
        config.do_sample, config.temperature, config.top_k, config.top_p = True, float(temperature), 0, 1.0
    adapter = get_adapter(target)
    visual = {adapter.image_token_id, getattr(adapter, "video_token_id", adapter.image_token_id)}
    config.suppress_tokens = sorted({*(config.suppress_tokens or []), *visual})
    if config.pad_token_id is None:
        config.pad_token_id = config.eos_token_id if isinstance(config.eos_token_id, int) else 0
    return config


class _ForwardLog:
    """Records the cache length at the start of every forward of the target's text model, and its input length."""

    def __init__(self, target):
        self.module = get_adapter(target).language_model
        self.starts: list[int] = []
        self.sizes: list[int] = []

    def _hook(self, module, args, kwargs):
        cache = kwargs.get(CACHE_KWARG, kwargs.get("past_key_values"))
        self.starts.append(cache.get_seq_length() if cache is not None else 0)
        inputs = kwargs.get("inputs_embeds")
        if inputs is None:
            inputs = kwargs.get("input_ids", args[0] if args else None)
        self.sizes.append(int(inputs.shape[1]))

    def __enter__(self) -> _ForwardLog:
        self._handle = self.module.register_forward_pre_hook(self._hook, with_kwargs=True)
        return self

    def __exit__(self, *exc) -> None:
        self._handle.remove()


class Method:
    """A decoding method. Subclasses implement `_generate` and list the models they add to the target in `models`."""

    name = ""
    supports_batches = False  # whether `generate_rows` decodes a batch

    @property
    def models(self) -> tuple[nn.Module, ...]:
        """Models besides the target whose weights the method keeps in memory."""
        return ()

    def generate(self, target, inputs: dict, *, temperature: float, max_new_tokens: int) -> MethodResult:
        """Decodes one sample. Randomness (T > 0) comes from torch's global generator: seed it before calling."""
        config = generation_config(target, temperature, max_new_tokens)
        prompt_len = inputs["input_ids"].shape[1]
        with _ForwardLog(target) as log:
            sequences, stats = self._generate(target, inputs, config, temperature)
        profile = {}
        if stats is not None and stats.step_time is not None:
            profile = dict(step_time=stats.step_time, verify_time=stats.verify_time, draft_time=stats.draft_time)
        return MethodResult(
            tokens=sequences[0, prompt_len:].tolist(),
            tokens_per_forward=tokens_per_forward(log.starts, prompt_len, sequences.shape[1]),
            forward_sizes=log.sizes,
            **profile,
        )

    def generate_rows(self, target, inputs: dict, *, temperature: float, max_new_tokens: int) -> RowsResult:
        """Decodes a left-padded batch (`inputs` with its `attention_mask`) in one call; seed as for `generate`."""
        if not self.supports_batches:
            raise ValueError(f"{self.name} decodes one prompt at a time")
        config = generation_config(target, temperature, max_new_tokens)
        eos = config.eos_token_id
        end_tokens = () if eos is None else (eos,) if isinstance(eos, int) else tuple(eos)
        prompt_len = inputs["input_ids"].shape[1]
        sequences, stats = self._generate(target, inputs, config, temperature)
        tokens = [row_tokens(row.tolist(), end_tokens) for row in sequences[:, prompt_len:]]
        if stats is None:  # plain decoding: one token per forward, until the row ends
            forwards = [len(row) for row in tokens]
        else:
            forwards = stats.row_target_forwards or [stats.target_forwards]
        return RowsResult(tokens, forwards)

    def _generate(self, target, inputs: dict, config: GenerationConfig, temperature: float):
        """Returns `(sequences [rows, seq_len], SpeculativeStats or None)`."""
        raise NotImplementedError


class Vanilla(Method):
    """Plain autoregressive `target.generate`: the reference every speedup is paired with."""

    name = "vanilla"
    supports_batches = True

    def _generate(self, target, inputs, config, temperature):
        return target.generate(**inputs, generation_config=config), None


class HFAssisted(Method):
    """transformers' own assisted generation (`assistant_model=`) with a small text-only language model sharing the
    target's vocabulary (`assistant_lm.py`) and its stock candidate schedule ("heuristic": the candidate count adapts
    and carries over from one call to the next, as it does for any user)."""

    name = "hf-assisted"

    def __init__(self, assistant: nn.Module):
        self.assistant = assistant

    @property
    def models(self):
        return (self.assistant,)

    def _generate(self, target, inputs, config, temperature):
        # The same suppression as the other methods, given as a processor: transformers hands the target's processors
        # to the assistant's own `generate()`, which would build a second one from `suppress_tokens` and warn.
        suppress = LogitsProcessorList([SuppressTokensLogitsProcessor(config.suppress_tokens, device=target.device)])
        config.suppress_tokens = None
        with _quiet_assistant_calls():
            sequences = target.generate(
                **inputs, generation_config=config, assistant_model=self.assistant, logits_processor=suppress
            )
        return sequences, None


class _quiet_assistant_calls(contextlib.AbstractContextManager):
    """Drops transformers' deprecation notice about `generation_config` passed with other generation arguments while
    it is active: its assisted decoding makes exactly such a call to the assistant itself, on every draft round (not
    this package's call, and the user of stock assisted decoding sees it too)."""

    NOTICE = "Passing `generation_config` together with generation-related"

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.NOTICE)

    def __enter__(self):
        transformers_logging.get_logger("transformers.generation.utils").addFilter(self)
        return self

    def __exit__(self, *exc) -> None:
        transformers_logging.get_logger("transformers.generation.utils").removeFilter(self)


class PromptLookup(Method):
    """transformers' prompt lookup decoding: candidates are n-gram continuations copied from the prompt."""

    name = "prompt-lookup"

    def __init__(self, num_tokens: int = 10):
        self.num_tokens = num_tokens

    def _generate(self, target, inputs, config, temperature):
        config.prompt_lookup_num_tokens = self.num_tokens
        return target.generate(**inputs, generation_config=config), None


class EagleVLMFixed(Method):
    """This project's lossless tree loop (`assistant_model=draft`), profiled, with the tree the benchmark chose per
    temperature (`--tree`)."""

    name = "eaglevlm-fixed"
    supports_batches = True

    def __init__(self, draft, trees: Mapping[float, SpeculativeConfig]):
        self.draft = draft
        self.trees = dict(trees)

    @property
    def models(self):
        return (self.draft,)

    def tree(self, temperature: float) -> SpeculativeConfig:
        """The tree chosen for `temperature`, else the draft's own `speculative_config` (auto by default)."""
        return self.trees.get(float(temperature), self.draft.speculative_config)

    def _generate(self, target, inputs, config, temperature):
        # `generate(assistant_model=draft)` as `speculative_generate` runs it: with statistics, and, like plain
        # `generate()` here, without returning the cache.
        tree = self.tree(temperature)
        output = speculative_generate(
            target, self.draft, depth=tree.depth, tree_top_k=tree.top_k, total_tokens=tree.total_tokens,
            profile=True, generation_config=config, **inputs,
        )  # fmt: skip
        return output.sequences, output.stats


class EagleVLMAuto(EagleVLMFixed):
    """The same loop as a user gets it from `generate(assistant_model=draft)` with no knobs: the draft's auto tree
    (`tuning.TreeTuner`), profiled."""

    name = "eaglevlm-auto"

    def __init__(self, draft):
        super().__init__(draft, {})

    def generate(self, target, inputs: dict, *, temperature: float, max_new_tokens: int) -> MethodResult:
        # Measure (or load) the device's costs before the timed, forward-counted call; a user pays this once per
        # machine (`tuning.device_costs`).
        self.draft.tree_tuner(get_adapter(target), temperature > 0, inputs["input_ids"].shape[1])
        return super().generate(target, inputs, temperature=temperature, max_new_tokens=max_new_tokens)

    def generate_rows(self, target, inputs: dict, *, temperature: float, max_new_tokens: int) -> RowsResult:
        # The costs are measured per batch size: once per machine and size, as for a user.
        rows, prompt_len = inputs["input_ids"].shape
        self.draft.tree_tuner(get_adapter(target), temperature > 0, prompt_len, rows)
        return super().generate_rows(target, inputs, temperature=temperature, max_new_tokens=max_new_tokens)


class SpecVLMFixed(EagleVLMFixed):
    """SpecVLM: the tree loop with a draft that sees the image through its elastic visual compressor
    (`compressor.py`), with the tree chosen for `eaglevlm-fixed` (so the two differ only in the draft)."""

    name = "specvlm-fixed"


class SpecVLMAuto(EagleVLMAuto):
    """SpecVLM as a user gets it: `generate(assistant_model=draft)` with no knobs (the auto tree), the draft with its
    compressor."""

    name = "specvlm-auto"


class Eagle3Fixed(EagleVLMFixed):
    """The tree loop with an EAGLE-3 draft (`modeling_eagle3.py`), with the tree chosen for `eaglevlm-fixed` (so the
    two differ only in the draft)."""

    name = "eagle3-fixed"


class Eagle3Auto(EagleVLMAuto):
    """An EAGLE-3 draft as a user gets it: `generate(assistant_model=draft)` with no knobs (the auto tree)."""

    name = "eagle3-auto"


class ParallelFixed(EagleVLMFixed):
    """The tree loop with a parallel draft (`SpecVLMDraftConfig.parallel_depth` above 1: depths 2 and on in one
    forward), with the tree chosen for `eaglevlm-fixed` (so the two differ only in the draft)."""

    name = "parallel-fixed"


class ParallelAuto(EagleVLMAuto):
    """A parallel draft as a user gets it: `generate(assistant_model=draft)` with no knobs (the auto tree)."""

    name = "parallel-auto"


METHOD_NAMES = (
    Vanilla.name, HFAssisted.name, PromptLookup.name, EagleVLMFixed.name, EagleVLMAuto.name, SpecVLMFixed.name,
    SpecVLMAuto.name, Eagle3Fixed.name, Eagle3Auto.name, ParallelFixed.name, ParallelAuto.name,
)  # fmt: skip
DRAFT_METHODS = (EagleVLMFixed.name, EagleVLMAuto.name)  # the methods that run `draft`
COMPRESSOR_METHODS = (SpecVLMFixed.name, SpecVLMAuto.name)  # the methods that run `specvlm_draft`
EAGLE3_METHODS = (Eagle3Fixed.name, Eagle3Auto.name)  # the methods that run `eagle3_draft`
PARALLEL_METHODS = (ParallelFixed.name, ParallelAuto.name)  # the methods that run `parallel_draft`
# the methods that run `--tree`'s tree
TREE_METHODS = (EagleVLMFixed.name, SpecVLMFixed.name, Eagle3Fixed.name, ParallelFixed.name)
OLD_METHOD_NAMES = {
    "eaglevlm": EagleVLMFixed.name, "eaglevlm-default": EagleVLMAuto.name, "specvlm": SpecVLMFixed.name,
    "specvlm-default": SpecVLMAuto.name, "eagle3": Eagle3Fixed.name, "eagle3-default": Eagle3Auto.name,
}  # fmt: skip  # earlier spellings, accepted with a FutureWarning; older benchmark records use them


def check_method_names(names: Sequence[str]) -> tuple[str, ...]:
    """`names` deduplicated in order, with "vanilla" first (every speedup is paired with it); an earlier spelling
    (`OLD_METHOD_NAMES`) is read as its new name, with a `FutureWarning`.

    Raises:
        `UnknownMethodError` listing the valid names.
    """
    renamed = [n for n in names if n in OLD_METHOD_NAMES]
    if renamed:
        warnings.warn(
            "method names changed: "
            + ", ".join(f"{n!r} is now {OLD_METHOD_NAMES[n]!r}" for n in renamed)
            + " (-fixed: the tree --tree chooses; -auto: the draft's auto tree, as generate() runs it)",
            FutureWarning,
            stacklevel=2,
        )
        names = [OLD_METHOD_NAMES.get(n, n) for n in names]
    unknown = [n for n in names if n not in METHOD_NAMES]
    if unknown:
        raise UnknownMethodError(f"unknown method(s): {', '.join(unknown)}; valid methods: {', '.join(METHOD_NAMES)}")
    return tuple(dict.fromkeys([Vanilla.name, *names]))


def build_methods(
    names: Sequence[str],
    *,
    draft=None,
    specvlm_draft=None,
    eagle3_draft=None,
    parallel_draft=None,
    assistant: nn.Module | None = None,
    trees: Mapping[float, SpeculativeConfig] | None = None,
    prompt_lookup_tokens: int = 10,
) -> dict[str, Method]:
    """The methods `names` (checked by `check_method_names`), given the models they need."""
    methods: dict[str, Method] = {}
    for name in check_method_names(names):
        if name == Vanilla.name:
            methods[name] = Vanilla()
        elif name == HFAssisted.name:
            if assistant is None:
                raise ValueError("method 'hf-assisted' needs an assistant language model")
            methods[name] = HFAssisted(assistant)
        elif name == PromptLookup.name:
            methods[name] = PromptLookup(prompt_lookup_tokens)
        elif name in EAGLE3_METHODS:
            if eagle3_draft is None:
                raise ValueError(f"method {name!r} needs an EAGLE-3 draft")
            methods[name] = (
                Eagle3Fixed(eagle3_draft, trees or {}) if name == Eagle3Fixed.name else Eagle3Auto(eagle3_draft)
            )
        elif name in PARALLEL_METHODS:
            if parallel_draft is None:
                raise ValueError(f"method {name!r} needs a parallel draft (parallel_depth above 1)")
            methods[name] = (
                ParallelFixed(parallel_draft, trees or {})
                if name == ParallelFixed.name
                else ParallelAuto(parallel_draft)
            )
        elif name in COMPRESSOR_METHODS:
            if specvlm_draft is None:
                raise ValueError(f"method {name!r} needs a draft with a compressor")
            methods[name] = (
                SpecVLMFixed(specvlm_draft, trees or {}) if name == SpecVLMFixed.name else SpecVLMAuto(specvlm_draft)
            )
        else:
            if draft is None:
                raise ValueError(f"method {name!r} needs a draft model")
            methods[name] = EagleVLMFixed(draft, trees or {}) if name == EagleVLMFixed.name else EagleVLMAuto(draft)
    return methods
