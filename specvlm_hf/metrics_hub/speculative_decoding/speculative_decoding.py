"""`evaluate` metric for speculative decoding: speedup tau paired with plain decoding, mean accepted length sigma and
exact match with the plain output, per method. Shipped inside `specvlm_hf` and loaded by local path (no hub access):

    import evaluate, specvlm_hf
    from pathlib import Path
    metric = evaluate.load(str(Path(specvlm_hf.__file__).parent / "metrics_hub" / "speculative_decoding"))
    metric.compute(predictions=[...], references=[...])

Each prediction is one speculative run: `method`, `wall_time` (seconds), `new_tokens`, `target_forwards`, `tokens`
(generated ids). Its reference is the plain-decoding run of the same prompt (and seed): `wall_time`, `new_tokens`,
`tokens`. The arithmetic is the benchmark's own (`specvlm_hf.benchmark.stats`, `specvlm_hf.metrics`).
"""

import datasets
import evaluate

from specvlm_hf.benchmark.stats import first_mismatch, paired_speedup, spread
from specvlm_hf.metrics import mean_accepted_length

_DESCRIPTION = """Speedup tau = (tokens/s of the run) / (tokens/s of plain decoding on the same prompt), summarised as
median, quartiles and range over runs; sigma = new tokens / target forwards (bonus token included, plain decoding
= 1.00); exact match = share of runs whose tokens equal the plain output (expected 1.0 at temperature 0)."""

_KWARGS_DESCRIPTION = """
Args:
    predictions: list of {"method": str, "wall_time": float, "new_tokens": int, "target_forwards": int,
        "tokens": list[int]}, one per speculative run.
    references: list of {"wall_time": float, "new_tokens": int, "tokens": list[int]}, the plain run of each prompt.
Returns:
    {method: {"speedup_median", "speedup_q1", "speedup_q3", "speedup_min", "speedup_max", "runs",
              "mean_accepted_length", "exact_match", "exact_match_rate"}}
"""

_CITATION = """@article{specvlm2025, title={SpecVLM: Fast Speculative Decoding in Vision-Language Models},
journal={arXiv preprint arXiv:2509.11815}, year={2025}}"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class SpeculativeDecoding(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": {
                        "method": datasets.Value("string"),
                        "wall_time": datasets.Value("float64"),
                        "new_tokens": datasets.Value("int64"),
                        "target_forwards": datasets.Value("int64"),
                        "tokens": datasets.Sequence(datasets.Value("int64")),
                    },
                    "references": {
                        "wall_time": datasets.Value("float64"),
                        "new_tokens": datasets.Value("int64"),
                        "tokens": datasets.Sequence(datasets.Value("int64")),
                    },
                }
            ),
        )

    def _compute(self, predictions, references):
        results = {}
        for method in dict.fromkeys(p["method"] for p in predictions):
            pairs = [(p, r) for p, r in zip(predictions, references) if p["method"] == method]
            taus = [paired_speedup(p["wall_time"], p["new_tokens"], r["wall_time"], r["new_tokens"]) for p, r in pairs]
            equal = sum(first_mismatch(p["tokens"], r["tokens"]) is None for p, r in pairs)
            forwards = sum(p["target_forwards"] for p, _ in pairs)
            tau = spread(taus)
            results[method] = {
                "speedup_median": tau.median,
                "speedup_q1": tau.q1,
                "speedup_q3": tau.q3,
                "speedup_min": tau.min,
                "speedup_max": tau.max,
                "runs": len(pairs),
                "mean_accepted_length": mean_accepted_length(sum(p["new_tokens"] for p, _ in pairs), forwards),
                "exact_match": equal,
                "exact_match_rate": equal / len(pairs),
            }
        return results
