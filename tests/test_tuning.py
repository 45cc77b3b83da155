"""The auto tree (`tuning.py`): the controller's choices on synthetic costs and acceptance, the cost cache, and the
auto path through `generate()` (still exact)."""

import json

import numpy as np
import pytest
import torch
from tiny import left_pad, make_inputs

from specvlm_hf import SpeculativeConfig, SpecVLMDraftModel
from specvlm_hf.adapters import get_adapter
from specvlm_hf.tuning import (
    CallChooser,
    CostCurve,
    DeviceCosts,
    TreeTuner,
    cache_dir,
    costs_key,
    device_costs,
    monotone,
)

SIZES = (1, 2, 3, 5, 9, 17, 33, 65)


def _costs(slope: float, level: float = 0.1) -> DeviceCosts:
    """T(q) = 1 + slope * (q - 1); one draft level costs `level` whatever its width."""
    curve = CostCurve(SIZES, tuple(1.0 + slope * (q - 1) for q in SIZES))
    return DeviceCosts(curve, {1: level, 2: level, 4: level, 8: level})


def _run(tuner: TreeTuner, accept, steps: int = 300) -> SpeculativeConfig:
    """Drives the tuner for `steps` steps where `accept(shape)` gives the sibling ranks of the accepted drafts;
    returns its last choice."""
    for _ in range(steps):
        shape = tuner.choose()
        if shape is None:  # a plain step: nothing drafted, nothing learned
            continue
        tuner.observe_mass(torch.tensor([0.6, 0.2, 0.1, 0.05, 0.02, 0.01, 0.01, 0.01]))
        k, d = shape.top_k, shape.depth
        drafting, verifying = tuner._draft[k][d - 1], tuner._verify[k][d - 1]  # as predicted: the scales stay 1
        tuner.observe(shape, accept(shape), drafting, drafting + verifying, finished=False)
    return tuner.choose()


def test_chain_depth_follows_acceptance_and_costs():
    rng = np.random.default_rng(0)

    def geometric(alpha):
        def accept(shape):
            n = 0
            while n < shape.depth and rng.random() < alpha:
                n += 1
            return [0] * n

        return accept

    steep = _costs(slope=0.2)  # verification cost grows fast with the tree: chains
    high = _run(TreeTuner(steep), geometric(0.95))
    low = _run(TreeTuner(steep), geometric(0.4))
    assert high.top_k == 1 and high.depth >= 6 and high.total_tokens == high.depth + 1
    # at alpha 0.4 a shallow chain and a plain step are within a few percent of each other
    assert low is None or (low.top_k == 1 and low.depth <= 3)


def test_flat_verification_cost_buys_width():
    rng = np.random.default_rng(1)

    def accept(shape):  # the target's token is the draft's r-th choice with probability 2^-(r+1)
        ranks = []
        while len(ranks) < shape.depth:
            rank = int(rng.geometric(0.5)) - 1
            if rank >= shape.top_k:
                break
            ranks.append(rank)
        return ranks

    flat = _run(TreeTuner(_costs(slope=0.0005)), accept)
    steep = _run(TreeTuner(_costs(slope=0.3)), accept)
    assert flat.top_k > 1 and steep.top_k == 1


def test_a_row_cut_inside_its_accepted_drafts_teaches_nothing_past_the_cut():
    tuner = TreeTuner(_costs(0.1))
    shape = SpeculativeConfig(depth=4, top_k=1, total_tokens=5)
    tuner.observe(shape, [], 0.1, 1.0, finished=True)
    assert tuner.reached[1].sum() == 0 and tuner.steps == 1
    tuner.observe(shape, [0, 0], 0.1, 1.0, finished=True)  # two drafts accepted, then the output stopped
    assert tuner.reached[1][:3].tolist() == [1, 1, 0] and tuner.accepted[1][:3].tolist() == [1, 1, 0]
    tuner.observe(shape, [0, 0], 0.1, 1.0, finished=False)  # two accepted, the third rejected
    assert tuner.reached[1][:4].tolist() == [2, 2, 1, 0] and tuner.accepted[1][:3].tolist() == [2, 2, 0]
    wide = SpeculativeConfig(depth=4, top_k=8, total_tokens=33)
    tuner.observe(wide, [5], 0.1, 1.0, finished=True)  # the end token accepted as the root's sixth draft
    assert tuner.reached[8][:2].tolist() == [1, 0] and tuner.accepted[8][:1].tolist() == [1]
    assert tuner.reached[4][:2].tolist() == [1, 0] and tuner.accepted[4][0] == 0  # narrower widths: rejected


def test_prompts_without_visual_tokens_keep_counts_of_their_own():
    tuner, chain = TreeTuner(_costs(0.1)), SpeculativeConfig(depth=3, top_k=1, total_tokens=4)
    tuner.start_call(visual=True)
    tuner.observe(chain, [0, 0, 0], 0.1, 1.0, finished=False)
    visual_alpha = tuner.alphas(1)[0]
    tuner.start_call(visual=False)  # a text-only prompt: fresh counts, the prior's estimate
    assert tuner.reached[1].sum() == 0 and tuner.alphas(1)[0] == pytest.approx(tuner.prior)
    for _ in range(3):
        tuner.observe(chain, [], 0.1, 1.0, finished=False)
    tuner.start_call(visual=True)  # back to image prompts: their counts, untouched by the rejections
    assert tuner.alphas(1)[0] == pytest.approx(visual_alpha) and tuner.reached[1][:3].tolist() == [1, 1, 1]
    tuner.start_call(visual=False)
    # three rejections at depth 1 against the prior's pseudo-steps (this call has no steps of its own yet)
    assert tuner.alphas(1)[0] == pytest.approx(tuner.strength * tuner.prior / (3 + tuner.strength))
    assert tuner.mass_steps == 0 and tuner.steps == 4  # costs and step counts are shared


def test_each_prompt_class_prices_its_steps_at_its_own_scales():
    """The costs were measured over one prefix; a class whose target steps run slower (long image prompts) or faster
    (short text prompts) in the loop keeps its own scales. Its `CallChooser` prices a step of plain decoding at T(1)
    times its verification scale where that is below 1 (prompts shorter than the measured prefix), and at T(1)
    where it is above (drafting evicts the target's weights from the caches, which plain decoding does not)."""
    tuner, chain = TreeTuner(_costs(0.2)), SpeculativeConfig(depth=3, top_k=1, total_tokens=4)
    t1, drafting, verifying = tuner.costs.curve.at(1), tuner._draft[1][2], tuner._verify[1][2]
    tuner.start_call(visual=True)
    for _ in range(40):  # image prompts: verification twice as slow as measured
        tuner.observe(chain, [0, 0], drafting, drafting + 2.0 * verifying, finished=False)
    assert tuner.verify_scale == pytest.approx(2.0, rel=1e-3) and tuner.calls[True].plain_step == t1
    tuner.observe_plain(1.5 * t1)
    tuner.start_call(visual=False)  # text prompts start from the isolated costs, not the image prompts' scales
    assert tuner.verify_scale == tuner.plain_scale == 1.0
    for _ in range(40):  # text prompts: verification at half the measured time
        tuner.observe(chain, [], drafting, drafting + 0.5 * verifying, finished=False)
    assert tuner.calls[False].plain_step == pytest.approx(0.5 * t1, rel=1e-3) and tuner.calls[True].plain_step == t1
    tuner.start_call(visual=True)
    assert tuner.verify_scale == pytest.approx(2.0, rel=1e-3) and tuner.plain_scale == pytest.approx(1.1)


def test_a_row_that_ends_on_the_targets_own_token_is_not_cut():
    from types import SimpleNamespace

    from specvlm_hf.generation import _cut_draft
    from specvlm_hf.tree import build_tree

    tree = build_tree(torch.tensor([7, 3, 4, 5]), [-1, 0, 0, 1])  # root 7; drafts 3, 4 below it; 5 below 3
    ended = SimpleNamespace(done=True, input_ids=torch.tensor([[1, 7, 3, 9]]))  # 3 accepted, then the target's 9
    assert _cut_draft(tree, [0, 1], ended) is None  # 9 is not the draft 5: the draft below node 1 was rejected
    cut = SimpleNamespace(done=True, input_ids=torch.tensor([[1, 7, 3, 5]]))  # the draft 5 accepted, then stopped
    assert _cut_draft(tree, [0, 1], cut) == 3
    going = SimpleNamespace(done=False, input_ids=torch.tensor([[1, 7, 3, 5]]))
    assert _cut_draft(tree, [0, 1], going) is None


def test_a_wide_step_teaches_every_narrower_width():
    tuner = TreeTuner(_costs(0.1))
    tree = SpeculativeConfig(depth=5, top_k=4, total_tokens=21)
    tuner.observe(tree, [0, 1, 0, 3], 0.1, 1.0, finished=False)
    assert tuner.accepted[1][:2].tolist() == [1, 0] and tuner.reached[1][:3].tolist() == [1, 1, 0]  # stops at rank 1
    assert tuner.accepted[2][:4].tolist() == [1, 1, 1, 0] and tuner.reached[2][:5].tolist() == [1, 1, 1, 1, 0]
    assert tuner.accepted[4][:5].tolist() == [1, 1, 1, 1, 0] and tuner.reached[4][:5].tolist() == [1] * 5
    assert tuner.reached[8].sum() == 0  # a wider tree might have accepted more: nothing learned


def test_costs_are_measured_once_and_cached_on_disk(target, draft, monkeypatch, tmp_path):
    monkeypatch.setenv("SPECVLM_HF_CACHE", str(tmp_path))
    from specvlm_hf import tuning

    monkeypatch.setattr(tuning, "_MEMORY", {})
    adapter = get_adapter(target)
    costs = device_costs(adapter, draft, prefix_len=24)
    assert cache_dir() == tmp_path
    stored = json.loads((tmp_path / f"costs-{costs_key(target, draft)}.json").read_text())
    assert DeviceCosts.from_json(stored) == costs
    assert costs.curve.sizes[0] == 1 and all(t > 0 for t in costs.curve.seconds)
    assert set(costs.draft_level) == {1, 2, 4, 8}

    monkeypatch.setattr(tuning, "_MEMORY", {})  # a new process: read from disk, nothing measured
    monkeypatch.setattr(tuning, "measure_verify_curve", lambda *a, **k: pytest.fail("measured again"))
    assert device_costs(adapter, draft, prefix_len=24) == costs


def test_speculative_config_is_auto_until_a_knob_is_set():
    assert SpeculativeConfig().is_auto
    assert not SpeculativeConfig(depth=3).is_auto
    assert SpeculativeConfig(depth=3).fixed() == SpeculativeConfig(depth=3, top_k=8, total_tokens=32)
    assert SpeculativeConfig().with_overrides(profile=True).is_auto


@pytest.mark.parametrize("do_sample", [False, True])
def test_auto_tree_through_generate_is_exact_and_learns(target, do_sample):
    torch.manual_seed(0)
    draft = SpecVLMDraftModel.from_target(target)  # its own tuners: the shared draft's may go to plain decoding
    inputs = make_inputs(seed=8)
    kwargs = dict(max_new_tokens=40, do_sample=do_sample, top_k=0)
    torch.manual_seed(3)
    plain = target.generate(**inputs, **kwargs)
    steps = {key: tuner.steps for key, tuner in draft._tuners.items()}  # other tests' calls (other numerics too)
    torch.manual_seed(3)
    out = target.generate(**inputs, **kwargs, assistant_model=draft)
    if not do_sample:
        assert torch.equal(out, plain)
    (tuner,) = [t for key, t in draft._tuners.items() if t.steps > steps.get(key, 0)]  # the one this call taught
    assert next(key for key, t in draft._tuners.items() if t is tuner)[2:4] == (do_sample, 1)
    assert sum(r.sum() for r in tuner.reached.values()) > 0


@pytest.mark.parametrize("prefix_len", [1, 3])
def test_costs_of_a_prompt_shorter_than_the_widest_level(target, draft, monkeypatch, tmp_path, prefix_len):
    monkeypatch.setenv("SPECVLM_HF_CACHE", str(tmp_path))
    from specvlm_hf import tuning

    monkeypatch.setattr(tuning, "_MEMORY", {})
    state = torch.get_rng_state()
    costs = device_costs(get_adapter(target), draft, prefix_len=prefix_len)
    assert torch.equal(torch.get_rng_state(), state)  # sampling's random stream is untouched
    assert set(costs.draft_level) == {1, 2, 4, 8} and costs.curve.prefix_len == prefix_len


@pytest.mark.parametrize(
    "content",
    [
        "{not json",
        '{"curve": {"sizes": [1], "seconds": [-1.0], "prefix_len": 4}, "draft_level": {"1": 0.1}}',
        '{"curve": 3, "draft_level": []}',
    ],
)
def test_a_damaged_cost_file_is_measured_again(target, draft, monkeypatch, tmp_path, content):
    monkeypatch.setenv("SPECVLM_HF_CACHE", str(tmp_path))
    from specvlm_hf import tuning

    monkeypatch.setattr(tuning, "_MEMORY", {})
    path = tmp_path / f"costs-{costs_key(target, draft)}.json"
    path.write_text(content)
    costs = device_costs(get_adapter(target), draft, prefix_len=8)
    assert DeviceCosts.from_json(json.loads(path.read_text())) == costs


def test_a_call_the_draft_cannot_predict_decodes_plainly_and_probes():
    tuner = TreeTuner(_costs(0.2))
    _run(tuner, lambda shape: [0] * shape.depth, steps=200)  # earlier calls: every draft accepted
    tuner.start_call()
    choices = []
    for _ in range(70):  # this call: nothing accepted; every step takes as long as predicted
        shape = tuner.choose()
        choices.append(shape)
        if shape is None:
            tuner.observe_plain(tuner.costs.curve.at(1))
        else:
            k, d = shape.top_k, shape.depth
            drafting, verifying = tuner._draft[k][d - 1], tuner._verify[k][d - 1]
            tuner.observe(shape, [], drafting, drafting + verifying, finished=False)
    drafted = [i for i, shape in enumerate(choices) if shape is not None]
    assert drafted[:1] == [0] and choices[0].depth >= 5  # starts from the running estimate
    # a few rejected steps, then plain steps with a probe after 8, then 16, then 32 (each probe rejected)
    first_plain = next(i for i, shape in enumerate(choices) if shape is None)
    probes = [i for i in drafted if i > first_plain]
    assert first_plain <= 5 and probes == [first_plain + 8, first_plain + 8 + 17, first_plain + 8 + 17 + 33]
    assert tuner.probe_gap == 64
    while (shape := tuner.choose()) is None:
        tuner.observe_plain(tuner.costs.curve.at(1))
    tuner.observe(shape, [0], 0.1, 1.0, finished=False)  # a probe with an accepted draft: probes every 8 again
    assert tuner.probe_gap == tuner.probe_every == 8
    tuner.start_call()  # the next call starts from the running estimate again, which still trusts the draft
    assert tuner.choose() is not None


def test_a_measured_cost_never_falls_with_size():
    assert monotone([7.2, 8.6, 7.8, 9.5]) == pytest.approx([7.2, 8.2, 8.2, 9.5])
    assert monotone([3.0, 2.0, 1.0]) == pytest.approx([2.0, 2.0, 2.0])
    assert monotone([1.0, 1.0, 2.0]) == [1.0, 1.0, 2.0]


def test_plain_steps_and_the_drafts_catch_up_keep_the_output(target, monkeypatch):
    """A tuner that expects nothing to be accepted takes plain steps; the draft catches up on the skipped positions
    at each probe. The output is plain generate()'s, and the draft's cache holds every committed position."""
    from specvlm_hf import SpecVLMDraftModel, speculative_generate
    from specvlm_hf.drafter import TreeDrafter

    torch.manual_seed(0)
    draft = SpecVLMDraftModel.from_target(target)
    inputs = make_inputs(seed=7)
    tuner = draft.tree_tuner(get_adapter(target), False, inputs["input_ids"].shape[1])
    tuner.prior, tuner.probe_every = 0.01, 3  # drafting never looks worth it: plain steps, a probe every 3
    made = []
    original = draft.new_drafter
    draft.new_drafter = lambda t, c=None: made.append(original(t, c)) or made[-1]
    roots = []  # the root's position at every step
    propose = TreeDrafter.propose_rows

    def recording(self, states):
        roots.append(states[0].input_ids.shape[1] - 1)
        return propose(self, states)

    monkeypatch.setattr(TreeDrafter, "propose_rows", recording)
    out = speculative_generate(target, draft, **inputs, max_new_tokens=20)
    assert torch.equal(out.sequences, target.generate(**inputs, max_new_tokens=20, do_sample=False))
    drafter = made[0]
    assert isinstance(drafter, TreeDrafter) and out.stats.target_forwards >= 15  # mostly one token per forward
    # every position before the last proposed root went into the draft's cache or waits to, none twice
    fed = drafter.forward.cache.length + sum(p[0].shape[1] for p in drafter._pending[0])
    assert fed == roots[-1] and len(roots) == out.stats.target_forwards - 1


def test_a_class_whose_answers_are_too_short_to_repay_the_prompt_pass_decodes_plainly(target):
    """Through generate(): a call of a class whose recent answers are all one token is left to plain decoding (with
    its output); its own answer, twenty tokens, goes into the class's lengths, and the next call drafts again."""
    from specvlm_hf import SpecVLMDraftModel, speculative_generate

    torch.manual_seed(0)
    draft = SpecVLMDraftModel.from_target(target)
    inputs = make_inputs(seed=7)
    prompt_len = inputs["input_ids"].shape[1]
    tuner = draft.tree_tuner(get_adapter(target), False, prompt_len)  # acceptance at the prior: drafting pays
    tuner.start_call(visual=True)
    plain = target.generate(**inputs, max_new_tokens=20, do_sample=False)
    tuner.prompt_price = 2.0 * tuner.plain_seconds() / prompt_len  # the draft's pass costs two plain steps
    tuner.calls[True].lengths.extend([1] * 16)  # recent answers: one token each
    out = speculative_generate(target, draft, **inputs, max_new_tokens=20)
    assert not out.stats.drafted and torch.equal(out.sequences, plain)
    assert list(tuner.calls[True].lengths)[-1] == 19  # tokens after the prefill's
    out = speculative_generate(target, draft, **inputs, max_new_tokens=20)
    assert out.stats.drafted and torch.equal(out.sequences, plain)


def test_a_call_that_never_starts_drafting_makes_no_draft_forward(target, monkeypatch):
    """Plain steps until the end (the start rule never says start): the output is plain generate()'s, and the call
    neither built the draft's lean forward nor compressed the prompt for it."""
    from specvlm_hf import SpecVLMDraftModel, speculative_generate
    from specvlm_hf.drafter import TreeDrafter

    torch.manual_seed(0)
    draft = SpecVLMDraftModel.from_target(target)
    inputs = make_inputs(seed=7)
    monkeypatch.setattr(TreeTuner, "may_start", lambda self, tokens: True)
    monkeypatch.setattr(TreeTuner, "starts_drafting", lambda self, emitted, tokens: False)
    monkeypatch.setattr(type(draft), "prompt_input", lambda *args: pytest.fail("the prompt was compressed"))
    made = []
    original = draft.new_drafter
    draft.new_drafter = lambda t, c=None: made.append(original(t, c)) or made[-1]
    out = speculative_generate(target, draft, **inputs, max_new_tokens=12)
    assert torch.equal(out.sequences, target.generate(**inputs, max_new_tokens=12, do_sample=False))
    assert out.stats.drafted and out.stats.target_forwards == out.stats.new_tokens  # one token per forward
    (drafter,) = made
    assert isinstance(drafter, TreeDrafter) and drafter.forward is None and out.stats.compressor_branch is None


def test_a_plain_step_is_priced_at_its_own_time_in_the_loop():
    """Plain steps are timed against T(1): when they run slower in the loop than T(1), drafting wins where it would
    not at T(1), and when they run at T(1) the drafted steps' in-loop scale does not make them look dearer."""
    tuner = TreeTuner(_costs(0.2, level=0.2), prior=0.3, strength=1e6)  # drafting barely loses at T(1)
    assert tuner.choose() is None
    for _ in range(30):
        tuner.observe_plain(2.0 * tuner.costs.curve.at(1))  # plain steps take twice T(1) in this loop
    tuner.plain_streak = 0
    assert tuner.choose() is not None
    tuner.verify_scale = 3.0  # drafted steps run slow in the loop; plain steps run at T(1)
    for _ in range(30):
        tuner.observe_plain(tuner.costs.curve.at(1))
    tuner._best = None
    assert tuner.choose() is None


def test_a_call_only_lowers_the_running_acceptance():
    """A call whose drafts fare better than the running estimate keeps that estimate (raising every alpha would
    compound over the depths into deep trees a few lucky steps cannot vouch for); one that fares worse lowers it."""
    tuner = TreeTuner(_costs(0.2))
    rng = np.random.default_rng(3)
    _run(tuner, lambda shape: [0] * next((i for i in range(shape.depth) if rng.random() > 0.7), shape.depth))
    tuner.start_call()
    shape = SpeculativeConfig(depth=4, top_k=1, total_tokens=5)
    for _ in range(5):
        tuner.observe(shape, [0, 0, 0, 0], 0.1, 1.0, finished=False)  # every draft accepted
    assert np.allclose(tuner.alphas(1), np.minimum(tuner._beta(1, None), 0.99))  # the running estimate, unscaled
    tuner.start_call()
    before = tuner.alphas(1)
    for _ in range(3):
        tuner.observe(shape, [], 0.1, 1.0, finished=False)  # nothing accepted
    assert np.all(tuner.alphas(1) < 0.8 * before)


def _choose_calls(chooser: CallChooser, rates: dict[bool, float], n: int) -> list[int]:
    """Runs `n` calls that reach `rates[drafted]` tokens per row and second; returns the indices of drafted calls."""
    drafted = []
    for i in range(n):
        way = chooser.draft()
        chooser.observe(way, 100.0, 100.0 / rates[way])  # 100 tokens per row
        if way:
            drafted.append(i)
    return drafted


def test_calls_whose_drafting_wins_clearly_never_try_plain_decoding():
    chooser = CallChooser(plain_step=0.01)  # the costs predict 100 tokens per row and second for plain decoding
    assert _choose_calls(chooser, {True: 160.0, False: 100.0}, 40) == list(range(40))
    assert chooser.rate(False) is None


def test_calls_draft_until_they_have_decoded_enough_tokens_to_judge():
    """Short drafted answers (whose rate the draft's pass over the prompt dominates) do not send calls to plain
    decoding: 64 tokens per row are needed first, and a long answer then outweighs them."""
    chooser = CallChooser(plain_step=0.01)
    for _ in range(10):
        assert chooser.draft()
        chooser.observe(True, 2.0, 0.05)  # 40 tokens per second
    assert chooser.draft()
    chooser.observe(True, 200.0, 0.8)  # a long answer at 250 tokens per second
    assert chooser.draft() and chooser.rate(True) > 150.0


def test_calls_whose_drafting_loses_are_left_to_plain_decoding_with_probes_ever_further_apart():
    """The first call drafts; below 1.5x the predicted plain rate the next tries plain decoding, which wins; drafting
    is tried again after 8, then 16, then 32 calls (each probe loses, doubling the gap)."""
    chooser = CallChooser(plain_step=0.01)
    assert _choose_calls(chooser, {True: 80.0, False: 100.0}, 100) == [0, 8, 25, 58]
    assert chooser.gap == 64


def test_a_probe_that_wins_brings_drafting_back():
    chooser = CallChooser(plain_step=0.01)
    _choose_calls(chooser, {True: 80.0, False: 100.0}, 20)  # plain decoding, the next probe at call 25
    drafted = _choose_calls(chooser, {True: 300.0, False: 100.0}, 20)  # drafting pays again (e.g. other prompts)
    assert drafted == list(range(5, 20)) and chooser.gap == chooser.min_gap


def test_calls_start_with_plain_decoding_where_the_costs_predict_no_clear_win():
    """Predicted below 1.5x plain decoding's rate, the first calls decode plainly; drafting is measured at the first
    probe, after 8 calls, and runs from then on when it wins (plain decoding probed once after 8 drafted calls)."""
    chooser = CallChooser(plain_step=0.01, predicted=120.0)
    assert _choose_calls(chooser, {True: 130.0, False: 100.0}, 20) == [i for i in range(8, 20) if i != 17]
    chooser = CallChooser(plain_step=0.01, predicted=120.0)
    assert _choose_calls(chooser, {True: 80.0, False: 100.0}, 40) == [8, 25]  # each probe loses: the gap doubles
    chooser = CallChooser(plain_step=0.01, predicted=150.0)  # at the threshold: draft first, as without a prediction
    assert _choose_calls(chooser, {True: 160.0, False: 100.0}, 10) == list(range(10))


@pytest.mark.predicted_calls
def test_the_prediction_comes_from_the_costs_and_the_prior_acceptance():
    """Where verifying q tokens costs q plain steps (a large batch: the forward is compute-bound), no tree can win
    clearly and calls start plain; where it costs about one, they draft."""
    compute_bound = DeviceCosts(CostCurve(SIZES, tuple(float(q) for q in SIZES)), {1: 0.05, 2: 0.08, 4: 0.1, 8: 0.2})
    tuner = TreeTuner(compute_bound)
    assert tuner.predicted_rate() < 1.5 and not tuner.calls[True].draft() and not tuner.calls[False].draft()
    tuner = TreeTuner(_costs(0.02))
    k, depth, rate = tuner.best_shape()
    assert rate == tuner.predicted_rate() > 1.5 and depth > 1 and tuner.calls[True].draft()
    # the prediction is the controller's own rate at the prior acceptance: E(d, k) / step seconds
    expected = tuner.expected_tokens(k, tuner.optimism)[depth - 1] / tuner.step_seconds(k)[depth - 1]
    assert rate == pytest.approx(expected)


@pytest.mark.predicted_calls
def test_a_first_call_predicted_to_lose_runs_plain_generate(target, monkeypatch):
    """Through generate(): costs that predict no clear win (here placed in the costs' memory for this batch size)
    leave the first call to plain decoding, with plain generate()'s output."""
    from specvlm_hf import tuning

    torch.manual_seed(5)
    draft = SpecVLMDraftModel.from_target(target)
    batch = left_pad([make_inputs(0, 3, True), make_inputs(1, 9, False)], pad_id=0)
    rows = batch["input_ids"].shape[0]
    compute_bound = DeviceCosts(
        CostCurve(SIZES, tuple(0.01 * q for q in SIZES)), {1: 0.005, 2: 0.008, 4: 0.01, 8: 0.02}
    )
    monkeypatch.setitem(tuning._MEMORY, costs_key(target, draft, rows), compute_bound)
    kwargs = dict(max_new_tokens=12, do_sample=False, return_dict_in_generate=True)
    expected = target.generate(**batch, **kwargs)
    out = target.generate(**batch, **kwargs, assistant_model=draft)
    assert not out.speculative_stats.drafted and torch.equal(out.sequences, expected.sequences)
    (tuner,) = [tuner for key, tuner in draft._tuners.items() if key[3] == rows]
    assert tuner.calls[True].rate(False) is not None  # plain decoding's rate, measured for the probes to compare


def test_a_call_left_to_plain_decoding_returns_what_plain_generate_returns(target):
    """Once drafted calls of a batch size lose, generate(assistant_model=draft) runs plain decoding's own method:
    the same sequences and cache, and statistics saying so."""
    torch.manual_seed(5)
    draft = SpecVLMDraftModel.from_target(target)  # its own tuners: this test steers them
    batch = left_pad([make_inputs(0, 3, True), make_inputs(1, 9, False)], pad_id=0)
    kwargs = dict(max_new_tokens=12, do_sample=False, return_dict_in_generate=True)
    expected = target.generate(**batch, **kwargs)
    first = target.generate(**batch, **kwargs, assistant_model=draft)
    assert first.speculative_stats.drafted and torch.equal(first.sequences, expected.sequences)
    rows = batch["input_ids"].shape[0]
    (tuner,) = [tuner for key, tuner in draft._tuners.items() if key[3] == rows]
    tuner.calls[True].observe(True, 100.0, 100.0)  # a drafted call as if hopeless: the next tries plain decoding
    out = target.generate(**batch, **kwargs, assistant_model=draft)
    assert not out.speculative_stats.drafted
    assert torch.equal(out.sequences, expected.sequences)
    for mine, plains in zip(out.past_key_values.layers, expected.past_key_values.layers):
        assert torch.equal(mine.keys, plains.keys) and torch.equal(mine.values, plains.values)
    stats = out.speculative_stats
    assert stats.row_new_tokens == [12] * rows and stats.mean_accepted_length == 1.0
    assert tuner.calls[True].rate(False) is not None


def _answers(tuner: TreeTuner, lengths: list[int]) -> None:
    """Calls of the current prompt class that answered in `lengths` tokens after the prefill's."""
    for n in lengths:
        tuner.calls[tuner.visual].observe(True, float(n), 0.01 * n)


def _price_prompt(tuner: TreeTuner, seconds: float, tokens: int) -> None:
    """A first drafted step whose drafting took `seconds` beyond its levels' predicted time over `tokens` tokens."""
    chain = SpeculativeConfig(depth=2, top_k=1, total_tokens=3)
    drafting = tuner._draft[1][1] + seconds
    tuner.observe(chain, [0], drafting, drafting + tuner._verify[1][1], finished=False, prompt_tokens=tokens)


def test_the_draft_s_pass_over_the_prompt_is_priced_by_the_first_drafted_steps():
    tuner = TreeTuner(_costs(0.2))
    scales = (tuner.verify_scale, tuner.draft_scale)
    _price_prompt(tuner, 2.0, 100)
    assert tuner.prompt_price == pytest.approx(0.02) and (tuner.verify_scale, tuner.draft_scale) == scales
    _price_prompt(tuner, 4.0, 100)  # a moving average, as the scales
    assert tuner.prompt_price == pytest.approx(0.02 + 0.2 * 0.02)
    tuner.start_call(visual=False)  # another class prices its own prompts
    assert tuner.prompt_price is None


def test_a_call_starts_drafting_where_the_answers_that_go_on_repay_the_prompt_pass():
    """The draft's pass over the prompt costs three plain steps here. Where every recent answer is one or two tokens no
    start repays it: the call is left to plain decoding. Where half the answers are two tokens and half sixty, the
    call takes plain steps until the short answers would have ended, then drafts. A call that outlasts every recent
    answer drafts, and so does one before anything is known or while fewer than eight answers are."""
    tuner = TreeTuner(_costs(0.02))  # flat verification: drafting wins on long answers
    tuner.start_call()
    assert tuner.starts_drafting(0, 100) and tuner.may_start(100)  # no price, no lengths yet
    _price_prompt(tuner, 3.0 * tuner.plain_seconds(), 100)
    assert tuner.starts_drafting(0, 100)  # a price, but no lengths yet
    _answers(tuner, [1] * 7)
    assert tuner.may_start(100) and tuner.starts_drafting(0, 100)  # too few answers to hold a call back
    _answers(tuner, [1] + [1, 2] * 8)
    assert not tuner.may_start(100) and not tuner.starts_drafting(0, 100)
    assert tuner.starts_drafting(2, 100)  # longer than every recent answer: a long one, drafting pays
    _answers(tuner, [2, 60] * 16)  # the last 32 answers: half 2 tokens, half 60
    assert tuner.may_start(100)
    assert not tuner.starts_drafting(0, 100) and not tuner.starts_drafting(1, 100) and tuner.starts_drafting(2, 100)
    _answers(tuner, [60] * 32)
    assert tuner.starts_drafting(0, 100)
