from specvlm_hf.testbed import heldout_prompts, load_testbed, load_testbed_draft  # also routes generate()

target, processor = load_testbed("testbed-qwen2-vl")  # the offline Qwen2-VL testbed (ships with specvlm_hf)
draft = load_testbed_draft("draft", target)  # shipped with specvlm_hf, loaded by name
inputs = heldout_prompts("long", n=1)[0].inputs(processor)
output = target.generate(**inputs, assistant_model=draft, max_new_tokens=256)  # same tokens as without the draft
