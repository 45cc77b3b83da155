"""Hub round trips with the real `huggingface_hub` client over HTTP (`HF_ENDPOINT`) against the local Hub-compatible
server in `hub_server.py`: push a draft and its card, pull it into a fresh cache (identical weights and generation),
revisions, offline mode with a warm cache, clear errors for a missing repo or file, and an interrupted upload that
leaves the previous revision loadable. Each client runs in its own process, since `huggingface_hub` reads its
endpoint at import."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from hub_server import HubServer

TESTS = Path(__file__).resolve().parent

PRELUDE = f"""
import json, sys, torch
sys.path.insert(0, {str(TESTS)!r})
from tiny import make_inputs, make_target
import specvlm_hf
from specvlm_hf import SpecVLMDraftModel
target = make_target(seed=0)
inputs = make_inputs(seed=3)
def generate(draft):
    return target.generate(**inputs, assistant_model=draft, max_new_tokens=12, do_sample=False)[0].tolist()
"""


def _client(code: str, hub: HubServer | None, home: Path, offline: bool = False) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HOME": str(home), "HF_HUB_DISABLE_XET": "1", "HF_TOKEN": "hf_test_token",
           "SPECVLM_HF_CACHE": str(home / "costs"), "HF_HUB_DISABLE_TELEMETRY": "1"}  # fmt: skip
    env["HF_ENDPOINT"] = hub.endpoint if hub is not None else "http://127.0.0.1:9"
    if offline:
        env["HF_HUB_OFFLINE"] = "1"
    return subprocess.run(
        [sys.executable, "-c", PRELUDE + textwrap.dedent(code)], env=env, capture_output=True, text=True, timeout=300
    )


def _ok(result: subprocess.CompletedProcess) -> dict:
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


PUSH = """
torch.manual_seed({seed})
draft = SpecVLMDraftModel.from_target(target)
commit = draft.push_to_hub("org/tiny-draft")
draft.save_pretrained({local!r})
from specvlm_hf.hub import create_model_card
create_model_card({local!r}, target_name="tiny LLaVA", repo_id="org/tiny-draft").push_to_hub("org/tiny-draft")
torch.save(draft.state_dict(), {local!r} + "/state.pt")
print(json.dumps({{"commit": commit.oid, "tokens": generate(draft)}}))
"""

PULL = """
from transformers import AutoModel
from huggingface_hub import ModelCard
draft = SpecVLMDraftModel.from_pretrained("org/tiny-draft", target=target{revision})
auto = AutoModel.from_pretrained("org/tiny-draft"{revision})
torch.save(draft.state_dict(), {out!r})
print(json.dumps({{"tokens": generate(draft), "auto": type(auto).__name__,
                   "card": ModelCard.load("org/tiny-draft").data.library_name}}))
"""


def _same_weights(a: Path, b: Path) -> bool:
    left, right = torch.load(a), torch.load(b)
    return left.keys() == right.keys() and all(torch.equal(left[k], right[k]) for k in left)


@pytest.mark.slow
def test_push_pull_revisions_offline_errors_and_an_interrupted_upload(tmp_path):
    with HubServer() as hub:
        pushed = _ok(_client(PUSH.format(seed=0, local=str(tmp_path / "v1")), hub, tmp_path / "pusher"))

        # A fresh cache pulls identical weights, and the draft decodes identically; no trust_remote_code anywhere.
        pulled = _ok(_client(PULL.format(revision="", out=str(tmp_path / "pulled.pt")), hub, tmp_path / "puller"))
        assert _same_weights(tmp_path / "v1" / "state.pt", tmp_path / "pulled.pt")
        assert pulled["tokens"] == pushed["tokens"] and pulled["auto"] == "SpecVLMDraftModel"
        assert pulled["card"] == "transformers"

        # A second version; the first stays reachable by its revision.
        _ok(_client(PUSH.format(seed=1, local=str(tmp_path / "v2")), hub, tmp_path / "pusher"))
        first = f', revision="{pushed["commit"]}"'
        _ok(_client(PULL.format(revision=first, out=str(tmp_path / "old.pt")), hub, tmp_path / "puller2"))
        assert _same_weights(tmp_path / "v1" / "state.pt", tmp_path / "old.pt")

        # An upload interrupted at the commit leaves the latest complete revision loadable.
        hub.state.fail_commits = True
        failed = _client(PUSH.format(seed=2, local=str(tmp_path / "v3")), hub, tmp_path / "pusher")
        assert failed.returncode != 0 and "the connection dropped" in failed.stderr
        hub.state.fail_commits = False
        _ok(_client(PULL.format(revision="", out=str(tmp_path / "after.pt")), hub, tmp_path / "puller3"))
        assert _same_weights(tmp_path / "v2" / "state.pt", tmp_path / "after.pt")

        # Missing repo, missing file: the Hub's errors, named.
        missing = _client(
            """
            try:
                SpecVLMDraftModel.from_pretrained("org/no-such-draft", target=target)
            except OSError as error:
                print(json.dumps({"error": str(error)}))
            from huggingface_hub import hf_hub_download
            from huggingface_hub.errors import EntryNotFoundError
            try:
                hf_hub_download("org/tiny-draft", "no-such-file.json")
            except EntryNotFoundError as error:
                print(json.dumps({"error": str(error), "entry": True}))
            """,
            hub,
            tmp_path / "puller4",
        )
        lines = [json.loads(line) for line in missing.stdout.strip().splitlines()]
        assert missing.returncode == 0, missing.stderr[-3000:]
        assert "org/no-such-draft" in lines[0]["error"] and lines[1]["entry"]

    # The server is gone: a warm cache still loads with HF_HUB_OFFLINE=1.
    offline = _client(PULL.format(revision="", out=str(tmp_path / "offline.pt")), None, tmp_path / "puller3", True)
    offline_result = _ok(offline)
    assert _same_weights(tmp_path / "v2" / "state.pt", tmp_path / "offline.pt")
    assert offline_result["auto"] == "SpecVLMDraftModel"
