"""`specvlm-hf launch-config`: writes one of the shipped `accelerate launch` configurations (`launch/*.yaml`, with the
DeepSpeed JSON it names) into a folder, so that multi-process training runs from any directory after a plain
install: `accelerate launch --config_file DIR/NAME.yaml -m specvlm_hf.cli train ...`."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

LAUNCH_DIR = Path(__file__).parent / "launch"
CONFIGS = tuple(sorted(p.stem for p in LAUNCH_DIR.glob("*.yaml")))
DEEPSPEED_FILE = re.compile(r"^(\s*deepspeed_config_file:\s*)(\S+)\s*$", re.M)


def write_launch_config(name: str, output: str | Path) -> list[Path]:
    """Writes `launch/{name}.yaml` into `output` (created), and the DeepSpeed JSON it names beside it with the YAML
    pointing at it by absolute path. Returns the written files, the YAML first.

    Raises:
        `ValueError` for a name that is not shipped (the message lists them), `FileExistsError` rather than
        overwrite a file.
    """
    if name not in CONFIGS:
        raise ValueError(f"no launch config {name!r}; the shipped ones are {', '.join(CONFIGS)}")
    output = Path(output)
    text = (LAUNCH_DIR / f"{name}.yaml").read_text()
    files = {output / f"{name}.yaml": text}
    match = DEEPSPEED_FILE.search(text)
    if match:
        json_path = (output / Path(match.group(2)).name).resolve()
        files[json_path] = (LAUNCH_DIR / json_path.name).read_text()
        files[output / f"{name}.yaml"] = DEEPSPEED_FILE.sub(lambda m: f"{m.group(1)}{json_path}", text)
    existing = [str(path) for path in files if path.exists()]
    if existing:
        raise FileExistsError(f"not overwriting {', '.join(existing)}")
    output.mkdir(parents=True, exist_ok=True)
    for path, content in files.items():
        path.write_text(content)
    return list(files)


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "launch-config",
        help="write an `accelerate launch` config for multi-process training (DDP, DeepSpeed, FSDP, 2 CPU processes)",
        description="Writes NAME.yaml (and the DeepSpeed JSON it names) into --output; then "
        "`accelerate launch --config_file OUTPUT/NAME.yaml -m specvlm_hf.cli train ...`.",
    )
    parser.add_argument("name", choices=CONFIGS, help="which configuration")
    parser.add_argument("--output", type=Path, required=True, help="folder to write into (created)")
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    try:
        written = write_launch_config(args.name, args.output)
    except FileExistsError as err:
        print(f"specvlm-hf launch-config: {err}")  # noqa: T201 (the command's output)
        return 1
    for path in written:
        print(path)  # noqa: T201 (the command's output)
    return 0
