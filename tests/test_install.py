"""A plain (non-editable) install works from any directory: the package ships what the documented commands need
(the testbeds and their drafts, launch configs, templates), and nothing reads the checkout."""

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from specvlm_hf.testbed import store
from specvlm_hf.training.launch_config import CONFIGS, write_launch_config

REPO = Path(__file__).resolve().parents[1]


def test_launch_config_writes_a_config_that_runs_from_anywhere(tmp_path):
    assert {"cpu_2proc", "ddp", "deepspeed_zero2", "deepspeed_zero3", "fsdp"} <= set(CONFIGS)
    yaml, ds_json = write_launch_config("deepspeed_zero3", tmp_path / "launch")
    named = re.search(r"deepspeed_config_file:\s*(\S+)", yaml.read_text()).group(1)
    assert Path(named) == ds_json and ds_json.is_absolute()
    assert json.loads(ds_json.read_text())["zero_optimization"]["stage"] == 3
    (only,) = write_launch_config("cpu_2proc", tmp_path / "launch")
    assert "num_processes: 2" in only.read_text()
    with pytest.raises(FileExistsError, match="not overwriting"):
        write_launch_config("cpu_2proc", tmp_path / "launch")
    with pytest.raises(ValueError, match="the shipped ones are cpu_2proc"):
        write_launch_config("zero4", tmp_path)


@pytest.mark.slow
@pytest.mark.skipif(
    not (store.is_valid(store.SHIPPED_DIR) and (store.SHIPPED_DRAFT_DIR / "config.json").is_file()),
    reason="no testbed and draft shipped in this checkout",
)
def test_a_non_editable_install_runs_the_documented_commands_outside_the_checkout(tmp_path):
    """A fresh venv over this interpreter's packages (torch, transformers: no download), the package installed into it
    from the checkout without `-e` (offline: this interpreter's pip and setuptools build it), then quickstart A, a
    short `bench --quick` and `launch-config` run from an empty folder."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)], check=True)
    python, cli = venv / "bin" / "python", venv / "bin" / "specvlm-hf"
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet", "--no-deps",
         "--no-build-isolation", "--no-index", str(REPO)],
        check=True, cwd=tmp_path, capture_output=True,
    )  # fmt: skip
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "SPECVLM_TESTBED_DIR")}

    def run(*command):
        done = subprocess.run(command, cwd=work, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        return done.stdout

    where = run(str(python), "-c", "import specvlm_hf; print(specvlm_hf.__file__)")
    assert Path(where.strip()).is_relative_to(venv)  # the installed copy, not the checkout
    section = (REPO / "README.md").read_text().split("## Quickstart A", 1)[1].split("\n## ", 1)[0]
    (snippet,) = re.findall(r"```python\n(.*?)```", section, re.S)
    check = textwrap.dedent("""
        import torch
        assert torch.equal(out, target.generate(**inputs, max_new_tokens=32, do_sample=False))
        print("quickstart A: equal")
    """)
    assert "quickstart A: equal" in run(str(python), "-c", snippet + check)
    table = run(str(cli), "bench", "--quick", "--methods", "vanilla,eaglevlm-auto", "--num-samples", "2",
                "--max-new-tokens", "16", "--temperatures", "0", "--output", "bench")  # fmt: skip
    assert "| eaglevlm-auto | 0 |" in table and "| 2/2 |" in table
    assert json.loads((work / "bench" / "benchmark.json").read_text())["config"]["quick"] is True
    assert "ddp.yaml" in run(str(cli), "launch-config", "ddp", "--output", "launch")
