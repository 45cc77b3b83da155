"""Serving engines: `check` runs an exported EAGLE-3 draft in vLLM beside this package (`specvlm-hf serve-check`);
`vllm_runner` is its vLLM side, run with the Python of vLLM's own environment."""
