"""The project's offline testbeds: a small LLaVA (stock `LlavaForConditionalGeneration` + `LlavaProcessor`) and a
small Qwen2-VL (stock `Qwen2VLForConditionalGeneration`, `load_testbed("testbed-qwen2-vl")`), trained from scratch on
synthetic scenes, shipped with the package with their trained drafts (`load_testbed_draft`), and rebuilt by
`specvlm-hf testbed build [--architecture qwen2_vl]`.

    from specvlm_hf.testbed import heldout_prompts, load_testbed, load_testbed_draft

    target, processor = load_testbed()
    draft = load_testbed_draft("specvlm-draft", target)
    prompt = heldout_prompts("long", n=1)[0]
    out = target.generate(**prompt.inputs(processor), assistant_model=draft, max_new_tokens=256)
"""

from .build import BuildConfig, build_testbed
from .dataset import Conversation, TestbedPrompt, export_llava_jsonl, heldout_prompts, training_conversations
from .store import (
    TestbedError,
    default_cache_dir,
    load_testbed,
    load_testbed_draft,
    resolve,
    shipped_draft_dir,
    verify,
)

__all__ = [
    "BuildConfig",
    "Conversation",
    "TestbedError",
    "TestbedPrompt",
    "build_testbed",
    "default_cache_dir",
    "export_llava_jsonl",
    "heldout_prompts",
    "load_testbed",
    "load_testbed_draft",
    "resolve",
    "shipped_draft_dir",
    "training_conversations",
    "verify",
]
