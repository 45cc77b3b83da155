import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from tiny import make_target  # noqa: E402

import specvlm_hf  # noqa: E402,F401  (installs the generate() integration)


@pytest.fixture(autouse=True, scope="session")
def _cost_cache(tmp_path_factory):
    """Measured tree costs (`tuning.device_costs`) go to a temporary directory, never the user's cache."""
    patch = pytest.MonkeyPatch()
    patch.setenv("SPECVLM_HF_CACHE", str(tmp_path_factory.mktemp("specvlm_hf_cache")))
    yield
    patch.undo()


@pytest.fixture(autouse=True)
def _calls_draft_first(request, monkeypatch):
    """The auto tree leaves a call to plain decoding from the start where the costs predict that drafting cannot win
    clearly (`CallChooser.predicted`). On the tests' tiny random models they do, and every auto-tree call would then
    run plain decoding: tests draft first, as a trained draft on the testbed does at batch sizes up to 16, unless
    marked `predicted_calls`."""
    if request.node.get_closest_marker("predicted_calls") is None:
        from specvlm_hf.tuning import TreeTuner

        monkeypatch.setattr(TreeTuner, "predicted_rate", lambda self: float("inf"))


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    torch.set_num_threads(2)


@pytest.fixture(scope="session")
def target():
    return make_target(seed=0)


@pytest.fixture(scope="session")
def draft(target):
    """A `SpecVLMDraftModel` with random weights (seed 0) bound to `target`; tests never modify it."""
    from specvlm_hf import SpecVLMDraftModel

    torch.manual_seed(0)
    return SpecVLMDraftModel.from_target(target)


@pytest.fixture(scope="session")
def deep_target():
    """A tiny LLaVA with 4 text layers: an EAGLE-3 draft reads three distinct ones (1, 2, 3)."""
    return make_target(seed=5, layers=4)


@pytest.fixture(scope="session")
def eagle3_draft(deep_target):
    """A `SpecVLMEagle3DraftModel` with random weights (seed 3) bound to `deep_target`; tests never modify it."""
    from specvlm_hf import SpecVLMEagle3DraftModel

    torch.manual_seed(3)
    return SpecVLMEagle3DraftModel.from_target(deep_target)


@pytest.fixture(scope="session")
def eager_target():
    return make_target(seed=1, attn_implementation="eager")


@pytest.fixture(scope="session")
def tiny_testbed(tmp_path_factory):
    """A toy testbed built by the project's own build code (seconds): `(target, processor)`."""
    from specvlm_hf.testbed.build import BuildConfig, build_testbed
    from specvlm_hf.testbed.store import load_testbed

    directory = tmp_path_factory.mktemp("testbed") / "tiny"
    build_testbed(directory, BuildConfig.tiny(), progress=False)
    return load_testbed(directory)
