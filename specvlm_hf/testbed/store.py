"""Where testbeds live and when one may be loaded: the completion manifest, atomic builds and `load_testbed`.

A testbed directory is valid only if its manifest (`testbed.json`, written last) lists every file with its
size and sha256 and all of them match; anything else is never loaded.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

MANIFEST = "testbed.json"
FORMAT = 1
ENV_VAR = "SPECVLM_TESTBED_DIR"
SHIPPED_DIR = Path(__file__).parent / "assets" / "testbed"
SHIPPED_DRAFT_DIR = Path(__file__).parent / "assets" / "draft"  # trained by `specvlm-hf train` on SHIPPED_DIR
SHIPPED_ASSISTANT_DIR = Path(__file__).parent / "assets" / "assistant"  # the hf-assisted baseline's assistant
# trained like SHIPPED_DRAFT_DIR, jointly with the elastic visual compressor (`specvlm-hf train --compressor elastic`)
SHIPPED_SPECVLM_DRAFT_DIR = Path(__file__).parent / "assets" / "specvlm-draft"
# an EAGLE-3 draft of SHIPPED_DIR trained with training-time test (`specvlm-hf train --family eagle3`), the one vLLM runs
SHIPPED_EAGLE3_DRAFT_DIR = Path(__file__).parent / "assets" / "eagle3-draft"
# the second testbed: a stock Qwen2-VL trained by the same recipe (`BuildConfig.qwen2_vl`), and its draft
SHIPPED_QWEN2_VL_DIR = Path(__file__).parent / "assets" / "testbed-qwen2-vl"
SHIPPED_QWEN2_VL_DRAFT_DIR = Path(__file__).parent / "assets" / "draft-qwen2-vl"
DEFAULT = "testbed"  # the LLaVA testbed, resolved by `resolve`
NAMED = {"testbed-qwen2-vl": SHIPPED_QWEN2_VL_DIR}  # other testbeds, by the name the CLIs take as --target
COMPANIONS = {
    SHIPPED_DIR: {"draft": SHIPPED_DRAFT_DIR, "specvlm-draft": SHIPPED_SPECVLM_DRAFT_DIR,
                  "eagle3-draft": SHIPPED_EAGLE3_DRAFT_DIR, "assistant": SHIPPED_ASSISTANT_DIR},
    SHIPPED_QWEN2_VL_DIR: {"draft": SHIPPED_QWEN2_VL_DRAFT_DIR},
}  # fmt: skip
# the shipped drafts by the name `load_testbed_draft` takes (the first three for `DEFAULT`, the last for Qwen2-VL)
SHIPPED_DRAFTS = {
    "draft": SHIPPED_DRAFT_DIR,
    "specvlm-draft": SHIPPED_SPECVLM_DRAFT_DIR,
    "eagle3-draft": SHIPPED_EAGLE3_DRAFT_DIR,
    "draft-qwen2-vl": SHIPPED_QWEN2_VL_DRAFT_DIR,
}
BUILD_MINUTES = {"llava": 40, "qwen2_vl": 85}  # a full build on 2 CPU cores, said before one starts
MODEL_FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "quality.json")


class TestbedError(RuntimeError):
    """No valid testbed where one was expected (missing, partial or corrupted)."""

    __test__ = False  # not a pytest test class despite its name


def default_cache_dir() -> Path:
    """`$XDG_CACHE_HOME/specvlm_hf/testbed`, or `~/.cache/specvlm_hf/testbed`."""
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "specvlm_hf" / "testbed"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify(directory: str | Path) -> dict:
    """Returns the manifest of a complete testbed at `directory`; raises `TestbedError` saying what is wrong."""
    directory = Path(directory)
    manifest_path = directory / MANIFEST
    if not manifest_path.is_file():
        raise TestbedError(f"{directory}: no {MANIFEST} (missing or unfinished build)")
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
    except (ValueError, KeyError, TypeError) as err:
        raise TestbedError(f"{manifest_path}: unreadable manifest ({err})") from err
    if manifest.get("format") != FORMAT:
        raise TestbedError(f"{manifest_path}: format {manifest.get('format')!r}, expected {FORMAT}")
    for name in manifest.get("required", []):
        if name not in files:
            raise TestbedError(f"{manifest_path}: required file {name} not listed")
    for name, entry in files.items():
        path = directory / name
        if not path.is_file() or path.stat().st_size != entry["bytes"] or _sha256(path) != entry["sha256"]:
            raise TestbedError(f"{path}: missing or does not match its checksum")
    return manifest


def build_config(directory: str | Path) -> dict:
    """The `BuildConfig` (as a dict) recorded in a testbed's manifest; empty when there is no manifest or it
    records none."""
    path = Path(directory) / MANIFEST
    return json.loads(path.read_text()).get("build", {}).get("config", {}) if path.is_file() else {}


def card_share(directory: str | Path) -> float:
    """The share of digit and word cards in the training data of the testbed at `directory` (0 without a
    manifest): what the draft's and the assistant's data and the quality report follow."""
    return build_config(directory).get("card_share", 0.0)


def is_valid(directory: str | Path) -> bool:
    try:
        verify(directory)
    except TestbedError:
        return False
    return True


def write_atomically(final: Path, write: Callable[[Path], dict], *, required: tuple[str, ...]) -> dict:
    """Runs `write(tmp)` in a fresh hidden sibling of `final`, adds the manifest last and renames it into place.

    `write` returns the build record stored in the manifest. If anything fails, the temporary directory is
    removed and an existing `final` is left as it was.
    """
    final = Path(final).absolute()
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.building-", dir=final.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the renamed directory should read like any other
    try:
        record = write(tmp)
        files = {
            p.relative_to(tmp).as_posix(): {"bytes": p.stat().st_size, "sha256": _sha256(p)}
            for p in sorted(tmp.rglob("*"))
            if p.is_file()
        }
        missing = [name for name in required if name not in files]
        if missing:
            raise TestbedError(f"build wrote no {', '.join(missing)}")
        total = sum(f["bytes"] for f in files.values())
        manifest = {
            "format": FORMAT,
            "required": list(required),
            "total_bytes": total,
            "files": files,
            "build": record,
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        if final.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=final.parent))
            final.rename(old / final.name)
            shutil.rmtree(old, ignore_errors=True)
        tmp.rename(final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def is_testbed(name) -> bool:
    """Whether a `--target` names a testbed (`"testbed"`, one of `NAMED`, or a directory with a testbed manifest)
    rather than another checkpoint: testbeds load through `load_testbed` (the Qwen2-VL testbed's processor is
    not one `AutoProcessor` knows)."""
    return isinstance(name, str) and (name == DEFAULT or name in NAMED or (Path(name) / MANIFEST).is_file())


def resolve(path: str | Path | None = None) -> tuple[Path, str]:
    """Where `load_testbed` loads from, and why: the explicit `path` (a directory, or a name in `NAMED`: the
    testbed shipped under it), else (`None` or `"testbed"`) `$SPECVLM_TESTBED_DIR`, then the copy shipped in the
    package (if valid), then the user cache."""
    if isinstance(path, str) and path in NAMED:
        return NAMED[path], "shipped with the package"
    if path is not None and path != DEFAULT:
        return Path(path), "argument"
    if os.environ.get(ENV_VAR):
        return Path(os.environ[ENV_VAR]), f"${ENV_VAR}"
    if is_valid(SHIPPED_DIR):
        return SHIPPED_DIR, "shipped with the package"
    return default_cache_dir(), "user cache"


def shipped_companion(kind: str, testbed_dir: str | Path) -> Path | None:
    """The shipped trained draft (`kind="draft"`), draft with the elastic visual compressor (`"specvlm-draft"`),
    EAGLE-3 draft (`"eagle3-draft"`) or hf-assisted assistant (`"assistant"`) for the testbed at `testbed_dir`: only a
    shipped testbed has them (a rebuilt testbed needs its own), and the Qwen2-VL testbed only a draft, so None
    otherwise."""
    if kind not in ("draft", "specvlm-draft", "eagle3-draft", "assistant"):
        raise ValueError(f"no companion kind {kind!r}")
    shipped = {d.absolute(): c for d, c in COMPANIONS.items()}.get(Path(testbed_dir).absolute(), {})
    directory = shipped.get(kind)
    return directory if directory is not None and (directory / "config.json").is_file() else None


def shipped_draft_dir(name: str) -> Path:
    """The directory of the shipped draft `name` (`"draft"`, `"specvlm-draft"`, `"eagle3-draft"` or `"draft-qwen2-vl"`, see
    `SHIPPED_DRAFTS`), inside the installed package: for CLI flags such as `--draft` or `--init-draft`."""
    if name not in SHIPPED_DRAFTS:
        raise ValueError(f"no shipped draft {name!r}; the shipped drafts are {', '.join(map(repr, SHIPPED_DRAFTS))}")
    directory = SHIPPED_DRAFTS[name]
    if not (directory / "config.json").is_file():
        raise TestbedError(f"{directory}: the shipped draft {name!r} is missing from this installation")
    return directory


def draft_location(name_or_path: str) -> str:
    """A shipped draft's directory by its name (`SHIPPED_DRAFTS`), else `name_or_path` unchanged (a folder or a Hub
    id): what the CLIs' draft flags accept."""
    return str(shipped_draft_dir(name_or_path)) if name_or_path in SHIPPED_DRAFTS else name_or_path


def load_testbed_draft(name: str, target, **kwargs):
    """Loads the shipped draft `name` for the testbed `target`, bound to it, from any working directory.

    Args:
        name (`str`): `"draft"` (EagleVLM: sees every visual token), `"specvlm-draft"` (with its elastic visual
            compressor) or `"eagle3-draft"` (EAGLE-3, the one vLLM serves). The LLaVA testbed (`load_testbed()`) has
            all three; the Qwen2-VL testbed (`load_testbed("testbed-qwen2-vl")`) has `"draft"` (also named
            `"draft-qwen2-vl"`), picked by the target's architecture.
        target: the testbed target the draft was trained for; a draft bound to another target is refused.
        kwargs: passed on to `SpecVLMDraftModel.from_pretrained`.

    Returns:
        `SpecVLMDraftModel`, ready for `target.generate(..., assistant_model=draft)`.
    """
    from ..modeling_draft import SpecVLMDraftModel

    if getattr(getattr(target, "config", None), "model_type", None) == "qwen2_vl" and name in COMPANIONS[SHIPPED_DIR]:
        if name not in COMPANIONS[SHIPPED_QWEN2_VL_DIR]:
            raise ValueError(f"the Qwen2-VL testbed ships no {name!r}; its one draft is 'draft'")
        name = "draft-qwen2-vl"
    return SpecVLMDraftModel.from_pretrained(shipped_draft_dir(name), target=target, **kwargs)


def _build_command(directory: Path) -> tuple[str, str]:
    """The `specvlm-hf testbed build` command for `directory`, and the testbed's architecture."""
    if directory == SHIPPED_QWEN2_VL_DIR:
        return f"specvlm-hf testbed build --architecture qwen2_vl --output {directory}", "qwen2_vl"
    return f"specvlm-hf testbed build --output {directory}", "llava"


def load_testbed(path: str | Path | None = None, *, build_if_missing: bool = False, dtype: torch.dtype = torch.float32,
                 device: str | torch.device | None = None):  # fmt: skip
    """Loads the testbed target and processor. Where the resolved directory holds no valid testbed it raises
    `TestbedError` naming the build command, unless `build_if_missing=True` asks for the build (about 40 minutes
    on 2 CPU cores for the LLaVA testbed, 85 for Qwen2-VL), which it then announces before starting.

    Args:
        path (`str` or `Path`, *optional*): a testbed directory or name (`"testbed-qwen2-vl"`); see `resolve` for
            the order without it.
        build_if_missing (`bool`): build into the resolved directory instead of raising `TestbedError`.
        dtype (`torch.dtype`): weights are stored in bfloat16 and cast to this dtype.
        device (`str` or `torch.device`, *optional*): where to move the model.

    Returns:
        `(target, processor)` of the testbed's architecture (`LlavaForConditionalGeneration` + `LlavaProcessor`, or
        `Qwen2VLForConditionalGeneration` + `ImageQwen2VLProcessor`), the model in eval mode.
    """
    directory, source = resolve(path)
    try:
        verify(directory)
    except TestbedError as err:
        command, arch = _build_command(directory)
        minutes = BUILD_MINUTES[arch]
        if not build_if_missing:
            raise TestbedError(
                f"no valid testbed at {directory} ({source}): {err}. Building one takes about {minutes} minutes on "
                f"2 CPU cores and never starts by itself: run `{command}`, or pass build_if_missing=True"
            ) from err
        from .build import BuildConfig, build_testbed

        logger.warning("no valid testbed at %s (%s, %s): building it now, about %d minutes on 2 CPU cores "
                       "(the same as `%s`)", directory, source, err, minutes, command)  # fmt: skip
        build_testbed(directory, BuildConfig.qwen2_vl() if arch == "qwen2_vl" else None)
        verify(directory)
    from .architectures import architecture

    arch = architecture(json.loads((directory / "config.json").read_text())["model_type"])
    model = arch.model_class.from_pretrained(directory, dtype=dtype)
    processor = arch.load_processor(directory)
    if device is not None:
        model.to(device)
    return model.eval(), processor
