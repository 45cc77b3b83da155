#!/usr/bin/env bash
# Renders the cards in this folder (run from the repository root); tests/test_hub.py renders the same inputs.
set -euo pipefail
specvlm-hf card --draft specvlm_hf/testbed/assets/draft --target-name "specvlm_hf testbed" \
  --repo-id specvlm-hf/testbed-draft --benchmark results/testbed-cpu/benchmark.json \
  --training-command "specvlm-hf train --target testbed --data testbed --num-samples 1600 --self-distill --epochs 4 --output runs/draft-greedy && specvlm-hf train --target testbed --data testbed --num-samples 1600 --self-distill --self-distill-temperature 1 --epochs 2 --init-draft runs/draft-greedy --no-eval-at-start --output runs/draft" \
  --usage model_cards/testbed-draft/usage.py --output model_cards/testbed-draft/README.md
cp model_cards/testbed-draft/README.md specvlm_hf/testbed/assets/draft/README.md

specvlm-hf card --draft specvlm_hf/testbed/assets/specvlm-draft --target-name "specvlm_hf testbed" \
  --repo-id specvlm-hf/testbed-specvlm-draft --benchmark results/testbed-cpu/benchmark.json \
  --training-command "specvlm-hf train --target testbed --data testbed --num-samples 1600 --self-distill --epochs 4 --compressor elastic --output runs/specvlm-greedy && specvlm-hf train --target testbed --data testbed --num-samples 1600 --self-distill --self-distill-temperature 1 --epochs 2 --init-draft runs/specvlm-greedy --no-eval-at-start --output runs/specvlm-draft" \
  --usage model_cards/testbed-specvlm-draft/usage.py --output model_cards/testbed-specvlm-draft/README.md
cp model_cards/testbed-specvlm-draft/README.md specvlm_hf/testbed/assets/specvlm-draft/README.md

specvlm-hf card --draft specvlm_hf/testbed/assets/draft-qwen2-vl --target-name "specvlm_hf testbed-qwen2-vl" \
  --repo-id specvlm-hf/testbed-qwen2-vl-draft --benchmark results/testbed-qwen2-vl-cpu/benchmark.json \
  --training-command "specvlm-hf train --target testbed-qwen2-vl --data testbed --num-samples 1600 --self-distill --epochs 2 --output runs/draft-qwen2-vl" \
  --usage model_cards/testbed-qwen2-vl-draft/usage.py --output model_cards/testbed-qwen2-vl-draft/README.md
cp model_cards/testbed-qwen2-vl-draft/README.md specvlm_hf/testbed/assets/draft-qwen2-vl/README.md

specvlm-hf card --draft specvlm_hf/testbed/assets/eagle3-draft --target-name "specvlm_hf testbed" \
  --repo-id specvlm-hf/testbed-eagle3-draft --benchmark results/testbed-cpu-eagle3/benchmark.json \
  --training-command "specvlm-hf train --target testbed --data testbed --num-samples 1600 --self-distill --self-distill-draft draft --epochs 4 --family eagle3 --ttt-steps 3 --output runs/eagle3-greedy && specvlm-hf train --target testbed --data testbed --num-samples 1600 --self-distill --self-distill-temperature 1 --epochs 2 --family eagle3 --ttt-steps 3 --init-draft runs/eagle3-greedy --no-eval-at-start --output runs/eagle3-draft" \
  --usage model_cards/testbed-eagle3-draft/usage.py --output model_cards/testbed-eagle3-draft/README.md
cp model_cards/testbed-eagle3-draft/README.md specvlm_hf/testbed/assets/eagle3-draft/README.md
