"""The docs stay true: the README's quickstart runs, every `specvlm-hf` command in README.md and docs/ parses with the
real parser, every relative link resolves, and the `generate()` argument table names every argument."""

import inspect
import re
import shlex
from pathlib import Path

import pytest
import torch

from specvlm_hf.cli import build_parser
from specvlm_hf.testbed import store

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
DOCS = sorted((REPO / "docs").rglob("*.md"))
FENCE = re.compile(r"```(\w*)\n(.*?)```", re.S)


def _blocks(path: Path, language: str) -> list[str]:
    return [body for lang, body in FENCE.findall(path.read_text()) if lang == language]


def _commands(path: Path) -> list[str]:
    """The `specvlm-hf ...` commands of a file's bash blocks: continuation lines joined, comments dropped, each
    command of a `&&` or `;` chain on its own."""
    commands = []
    for block in _blocks(path, "bash"):
        for line in block.replace("\\\n", " ").splitlines():
            for part in re.split(r"&&|;|\|", line.split("  #")[0]):
                if part.strip().startswith("specvlm-hf "):
                    commands.append(part.strip())
    return commands


@pytest.mark.skipif(
    not (store.is_valid(store.SHIPPED_DIR) and (store.SHIPPED_SPECVLM_DRAFT_DIR / "config.json").is_file()),
    reason="no testbed and draft shipped in this checkout",
)
def test_readme_quickstart_a_runs_and_is_lossless(tmp_path, monkeypatch):
    section = README.read_text().split("## Quickstart A", 1)[1].split("\n## ", 1)[0]
    (snippet,) = [body for lang, body in FENCE.findall(section) if lang == "python"]
    monkeypatch.chdir(tmp_path)  # no path into the checkout
    namespace = {}
    exec(snippet, namespace)
    target, inputs, out = namespace["target"], namespace["inputs"], namespace["out"]
    max_new_tokens = int(re.search(r"max_new_tokens=(\d+)", snippet).group(1))
    assert max_new_tokens <= 32  # keep the test quick
    assert torch.equal(out, target.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False))


@pytest.mark.parametrize("path", [README, *DOCS], ids=lambda p: str(p.relative_to(REPO)))
def test_every_python_snippet_compiles(path):
    for block in _blocks(path, "python"):
        compile(block, str(path), "exec")


@pytest.mark.skipif(
    not (store.is_valid(store.SHIPPED_DIR) and (store.SHIPPED_DRAFT_DIR / "config.json").is_file()),
    reason="no testbed and draft shipped in this checkout",
)
def test_the_docs_testbed_snippets_run(tmp_path, monkeypatch):
    """The snippets that need no file of the reader's run as written: the testbeds page, the batches guide (which
    asserts its own equality), and the Python API's `speculative_generate` on quickstart A's target and draft."""
    monkeypatch.chdir(tmp_path)
    (testbeds,) = _blocks(REPO / "docs" / "testbeds.md", "python")
    namespace = {}
    exec(testbeds, namespace)
    assert namespace["draft"].target is namespace["target"] and namespace["prompt"].kind == "long"
    (batches,) = _blocks(REPO / "docs" / "guides" / "batches.md", "python")
    exec(batches, {})
    section = README.read_text().split("## Quickstart A", 1)[1].split("\n## ", 1)[0]
    (quickstart,) = [body for lang, body in FENCE.findall(section) if lang == "python"]
    (api,) = _blocks(REPO / "docs" / "reference" / "python-api.md", "python")
    namespace = {}
    exec(quickstart + api, namespace)
    stats = namespace["res"].stats
    assert stats.target_forwards < stats.new_tokens  # the shipped draft accepts more than one token per step


@pytest.mark.parametrize("path", [README, *DOCS], ids=lambda p: str(p.relative_to(REPO)))
def test_every_specvlm_hf_command_parses(path):
    parser = build_parser()
    for command in _commands(path):
        try:
            parser.parse_args(shlex.split(command)[1:])
        except SystemExit as exit_:
            pytest.fail(f"{path.name}: `{command}` does not parse (exit {exit_.code})")


def test_the_readme_has_commands_to_check():
    assert any(c.startswith("specvlm-hf bench --quick") for c in _commands(README))
    assert any(c.startswith("specvlm-hf train ") for c in _commands(README))


@pytest.mark.parametrize("path", [README, *DOCS], ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_resolve(path):
    missing = []
    for link in re.findall(r"\]\(([^)\s]+)\)", path.read_text()):
        if re.match(r"[a-z]+:", link) or link.startswith("#"):
            continue
        resolved = (path.parent / link.split("#")[0]).resolve()
        if not resolved.exists():
            missing.append(link)
    assert missing == []


def test_the_generate_argument_table_names_every_argument():
    from transformers import GenerationConfig, GenerationMixin

    table = (REPO / "docs" / "reference" / "generate.md").read_text()
    named = set(re.findall(r"`([a-z_]+)`", table))
    fields = {name for name in GenerationConfig().to_dict() if not name.startswith("_")} - {"transformers_version"}
    parameters = set(inspect.signature(GenerationMixin.generate).parameters) - {"self", "kwargs"}
    assert sorted((fields | parameters) - named) == []
