import specvlm_hf  # registers the draft class and the generate() integration
from specvlm_hf import SpecVLMDraftModel
from specvlm_hf.testbed import heldout_prompts, load_testbed

target, processor = load_testbed("testbed-qwen2-vl")  # the offline Qwen2-VL testbed (ships with specvlm_hf)
draft = SpecVLMDraftModel.from_pretrained("specvlm_hf/testbed/assets/draft-qwen2-vl", target=target)
inputs = heldout_prompts("long", n=1)[0].inputs(processor)
output = target.generate(**inputs, assistant_model=draft, max_new_tokens=256)  # same tokens as without the draft
