"""Multi-process training on CPU: `tests/distributed_train.py` launched in two processes (gloo) with
`specvlm_hf/training/launch/cpu_2proc.yaml` trains, checkpoints, resumes after `kill -9` losing at most one save
interval, and ends with the weights of a one-process run with the same global batch.

Why the weights must match: accelerate's seedable sampler draws the same permutation of the rows in any number of
processes and deals per-device batches round-robin, so with 24 rows, 2 processes x 2 rows cover at each step the 4
rows one process x 4 rows does (24 is a multiple of the global batch, so no process wraps around to pad an epoch).
The loss is the mean over the global batch's supervised positions and DDP averages gradients over the processes
(`DistillationTrainer.get_batch_samples`), so both compute one gradient up to float rounding, which differs only
through batch shapes (each process pads its 2 rows to their own length). Adam moves every coordinate by about the
learning rate (1e-3) per step whatever the gradient's size, so anything that changed what is learned (other rows, a
mean of per-process means: 7e-3 here) moves weights by ~1e-3; rounding moved them by 2e-7. TOLERANCE (1e-5, 1% of one
step) separates the two.
"""

import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from distributed_train import main as train_in_process
from safetensors.torch import load_file

from specvlm_hf import SpecVLMDraftModel
from specvlm_hf.training import DistillationConfig
from specvlm_hf.training.config import accumulation_steps
from specvlm_hf.training.pipeline import last_complete_checkpoint

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "distributed_train.py"
CONFIG = ROOT / "specvlm_hf" / "training" / "launch" / "cpu_2proc.yaml"
STEPS, SAVE_STEPS = 6, 2
TOLERANCE = 1e-5


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(testbed: str, output: Path, *args: str, background: bool = False):
    """`accelerate launch` of the training script in two processes; returns rank 0's `run.json`, or the launcher's
    process with `background`."""
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIG),
        "--main_process_port", str(_free_port()), str(SCRIPT), "--testbed", testbed, "--output", str(output),
        "--max-steps", str(STEPS), "--save-steps", str(SAVE_STEPS), *args,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    log = output.parent / f"{output.name}.log"
    with log.open("a") as handle:
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=handle, stderr=subprocess.STDOUT)
    if background:
        return process
    try:
        assert process.wait(timeout=180) == 0, log.read_text()[-3000:]
    finally:
        kill_tree(process)
    return json.loads((output / "run.json").read_text())


def kill_tree(process: subprocess.Popen) -> None:
    """SIGKILL to the launcher and every process under it. (Killing its process group is not enough: torchrun
    starts each worker in a session of its own.)"""
    try:
        tree = [*psutil.Process(process.pid).children(recursive=True), psutil.Process(process.pid)]
    except psutil.NoSuchProcess:
        tree = []
    for member in tree:
        try:
            member.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    process.wait(timeout=30)
    psutil.wait_procs(tree, timeout=30)


def weights(output: Path) -> dict[str, torch.Tensor]:
    return load_file(output / "model.safetensors")


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=TOLERANCE, rtol=0, msg=lambda m, key=key: f"{key}: {m}")


@pytest.fixture(scope="module")
def testbed(tiny_testbed) -> str:
    """The directory of the session's tiny testbed (saved to disk by its build), for the launched processes."""
    return tiny_testbed[0].name_or_path


@pytest.fixture(scope="module")
def one_process(testbed, tmp_path_factory) -> Path:
    """The reference: one process, 4 rows per step."""
    output = tmp_path_factory.mktemp("one_process")
    train_in_process(["--testbed", testbed, "--output", str(output), "--batch-size", "4", "--max-steps", str(STEPS)])
    return output


@pytest.mark.slow
def test_two_processes_train_checkpoint_and_match_one_process(tiny_testbed, testbed, one_process, tmp_path):
    run = launch(testbed, tmp_path / "run", "--batch-size", "2")
    assert run["backend"] == "gloo" and run["world_size"] == 2 and run["start_step"] == 0
    assert run["summary"]["steps"] == STEPS and all(math.isfinite(loss) for loss in run["losses"])
    for step in range(SAVE_STEPS, STEPS + 1, SAVE_STEPS):
        checkpoint = tmp_path / "run" / f"checkpoint-{step}"
        assert (checkpoint / "trainer_state.json").exists() and (checkpoint / "model.safetensors").exists()
        assert {p.name for p in checkpoint.glob("rng_state_*.pth")} == {"rng_state_0.pth", "rng_state_1.pth"}

    torch.manual_seed(0)
    initial = SpecVLMDraftModel.from_target(tiny_testbed[0]).state_dict()
    trained = weights(tmp_path / "run")
    assert not torch.equal(trained["fc.weight"], initial["fc.weight"])  # it learned
    assert_same_weights(trained, weights(one_process))


@pytest.mark.slow
def test_kill_9_loses_at_most_one_save_interval(testbed, one_process, tmp_path):
    output = tmp_path / "run"
    killed = launch(testbed, output, "--batch-size", "2", "--step-delay", "0.5", background=True)
    try:
        deadline = time.monotonic() + 120
        while not (output / f"checkpoint-{SAVE_STEPS}" / "trainer_state.json").exists():
            assert killed.poll() is None and time.monotonic() < deadline, "no checkpoint before the run ended"
            time.sleep(0.1)
        time.sleep(0.7)  # into the next save interval
    finally:
        kill_tree(killed)  # kill -9 of the launcher and both workers
    reached = int((output / "progress.txt").read_text().split()[-1])
    saved = int(Path(last_complete_checkpoint(output)).name.split("-")[1])
    assert reached < STEPS, "the run finished before it was killed"
    assert reached - saved <= SAVE_STEPS

    resumed = launch(testbed, output, "--batch-size", "2")
    assert resumed["start_step"] == saved and resumed["summary"]["resumed_from"].endswith(f"checkpoint-{saved}")
    assert resumed["summary"]["steps"] == STEPS
    assert_same_weights(weights(output), weights(one_process))  # resumed exactly: weights, optimizer, data position


@pytest.mark.slow
def test_a_compressor_and_the_curve_under_two_processes(testbed, tmp_path):
    """A select-mode compressor leaves the branches no row chose without a gradient (DDP must be told); the curve is
    measured once per epoch, on the main process, and the gate's counts cover both processes' rows."""
    args = ["--batch-size", "1", "--rows", "6", "--max-steps", "3", "--compressor", "elastic", "--eval-prompts", "2"]
    run = launch(testbed, tmp_path / "run", *args)
    assert run["summary"]["steps"] == 3 and sum(run["summary"]["compressor_branches"].values()) == 3 * 2
    assert [point["epoch"] for point in run["summary"]["curve"]] == [0.0, 1.0]
    log = (tmp_path / "run.log").read_text()
    assert log.count("epoch 0.00: mean accepted length") == 1 and log.count("epoch 1.00: mean accepted length") == 1


def test_gradient_accumulation_matches_one_large_batch(testbed, one_process, tmp_path):
    """The loss is normalised over the whole step, not per micro-batch: 2 rows x 2 accumulation steps = 4 rows."""
    args = ["--testbed", testbed, "--output", str(tmp_path), "--max-steps", str(STEPS), "--batch-size", "2"]
    run = train_in_process([*args, "--global-batch-size", "4"])
    assert run["gradient_accumulation_steps"] == 2
    assert_same_weights(weights(tmp_path), weights(one_process))


def test_a_global_batch_that_does_not_divide_is_refused():
    assert accumulation_steps(32, 4, 2) == 4
    with pytest.raises(ValueError, match=r"global batch of 6 rows does not divide into 2 process\(es\) x 2 rows"):
        accumulation_steps(6, 2, 2)
    with pytest.raises(ValueError, match=r"use a multiple of 4 \(e\.g\. 4 or 8\)"):
        accumulation_steps(6, 2, 2)
    with pytest.raises(ValueError, match="does not divide"):
        DistillationConfig(output_dir="unused", per_device_train_batch_size=4, global_batch_size=6, use_cpu=True)


@pytest.mark.slow
def test_the_train_cli_in_two_processes(testbed, tmp_path):
    """`specvlm-hf train` itself under the launcher: a global batch that does not divide stops both processes with
    the reason; one that divides trains, with the rows written once and the summary printed once."""

    def train_cli(output: Path, global_batch: int) -> subprocess.CompletedProcess:
        command = [
            sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIG), "--main_process_port",
            str(_free_port()), "-m", "specvlm_hf.cli", "train", "--target", testbed, "--data", "testbed",
            "--num-samples", "4", "--batch-size", "2", "--global-batch-size", str(global_batch), "--max-steps", "2",
            "--eval-prompts", "0", "--threads", "1", "--output", str(output),
        ]  # fmt: skip
        env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
        return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)

    refused = train_cli(tmp_path / "refused", 6)
    assert refused.returncode != 0
    assert "A global batch of 6 rows does not divide into 2 process(es) x 2 rows" in refused.stderr
    done = train_cli(tmp_path / "done", 4)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("draft saved to") == 1  # printed by the main process only
    assert (tmp_path / "done" / "model.safetensors").exists()
    assert json.loads((tmp_path / "done" / "training_summary.json").read_text())["steps"] == 2


def test_an_incomplete_checkpoint_is_passed_over(tmp_path):
    for step, complete in ((2, True), (4, True), (6, False)):  # checkpoint-6: killed while saving
        (tmp_path / f"checkpoint-{step}").mkdir()
        (tmp_path / f"checkpoint-{step}" / "model.safetensors").write_bytes(b"")
        if complete:
            (tmp_path / f"checkpoint-{step}" / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    (tmp_path / "checkpoint-10").mkdir()
    (tmp_path / "checkpoint-10" / "trainer_state.json").write_text('{"global_st')  # killed mid-write
    assert last_complete_checkpoint(tmp_path) == str(tmp_path / "checkpoint-4")
    assert last_complete_checkpoint(tmp_path / "missing") is None
