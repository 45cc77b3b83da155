"""Model cards for trained drafts, rendered offline from the package's Jinja template. Publishing is the stock
`draft.push_to_hub(repo_id)` (weights and config; the borrowed target weights are never included) plus
`card.push_to_hub(repo_id)`."""

from __future__ import annotations

import json
from pathlib import Path

from huggingface_hub import ModelCard, ModelCardData

TEMPLATE = Path(__file__).parent / "templates" / "draft_model_card.md"


def create_model_card(
    draft_dir: str | Path,
    *,
    target_name: str,
    repo_id: str | None = None,
    benchmark_markdown: str | None = None,
    license: str = "apache-2.0",
) -> ModelCard:
    """
    Renders the card of the draft saved in `draft_dir`, reading when present its
    `training_summary.json` and `acceptance_curve.json` (written by `specvlm-hf train`).

    Args:
        target_name (`str`): the target's Hub id or name (becomes `base_model`).
        repo_id (`str`, *optional*): where the draft is (or will be) published; defaults to the folder name.
        benchmark_markdown (`str`, *optional*): a measured speed table to include.
    """
    draft_dir = Path(draft_dir)
    if not (draft_dir / "config.json").exists():
        raise FileNotFoundError(f"{draft_dir} holds no saved draft (config.json missing)")
    summary_path, curve_path = draft_dir / "training_summary.json", draft_dir / "acceptance_curve.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else None
    curve = json.loads(curve_path.read_text()) if curve_path.exists() else None
    weights = draft_dir / "model.safetensors"
    num_parameters = "unknown"
    if weights.exists():
        from safetensors import safe_open

        with safe_open(str(weights), "pt") as handle:
            num_parameters = f"{sum(_numel(handle.get_slice(key).get_shape()) for key in handle.keys()):,}"
    card_data = ModelCardData(
        library_name="transformers",
        license=license,
        base_model=target_name,
        pipeline_tag="image-text-to-text",
        tags=["speculative-decoding", "eagle", "specvlm", "draft-model"],
    )
    return ModelCard.from_template(
        card_data,
        template_path=str(TEMPLATE),
        model_name=repo_id or draft_dir.name,
        repo_id=repo_id or str(draft_dir),
        target_name=target_name,
        num_parameters=num_parameters,
        lambda_logit=(summary or {}).get("lambda_logit", 0.1),
        lambda_feat=(summary or {}).get("lambda_feat", 1.0),
        summary=summary,
        curve=curve,
        benchmark=benchmark_markdown,
    )


def _numel(shape) -> int:
    total = 1
    for size in shape:
        total *= size
    return total
