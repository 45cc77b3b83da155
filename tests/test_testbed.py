"""The offline testbed: tiny build round trip, deterministic data, quality-report functions, manifest checks."""

from __future__ import annotations

import dataclasses
import json
import random
import shutil
from collections import Counter

import pytest
import torch
from transformers import AutoProcessor, LlavaForConditionalGeneration

from specvlm_hf.testbed import (
    BuildConfig,
    TestbedError,
    build_testbed,
    export_llava_jsonl,
    heldout_prompts,
    load_testbed,
    load_testbed_draft,
    quality,
    resolve,
    store,
    training_conversations,
    verify,
)
from specvlm_hf.testbed import build as build_module
from specvlm_hf.testbed.architectures import Qwen2VLTestbed, clip_pixel_values
from specvlm_hf.testbed.dataset import sample_conversation
from specvlm_hf.testbed.grammar import (
    _CENTER_DETAILS,
    _COLOUR_DETAILS,
    _EDGE_DETAILS,
    _SHAPE_DETAILS,
    _SIZE_DETAILS,
    CARD_CATEGORIES,
    OPTIONS,
    SHORT_CATEGORIES,
    TRAIN_WEIGHTS,
    _object_sentences,
    caption_turn,
    long_turn,
    short_turn,
)
from specvlm_hf.testbed.scenes import (
    COLOURS,
    SHAPES,
    Scene,
    Text,
    render_scene,
    sample_card,
    sample_scene,
    text_box,
)
from specvlm_hf.testbed.train import CHARACTERS, encode_conversation, make_batch, patch_labels


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("testbed") / "tiny"
    build_testbed(directory, BuildConfig.tiny(), progress=False)
    return directory


@pytest.fixture(scope="module")
def tiny_qwen_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("testbed") / "tiny-qwen2-vl"
    build_testbed(directory, BuildConfig.tiny(architecture="qwen2_vl"), progress=False)
    return directory


def test_tiny_build_round_trips_through_from_pretrained(tiny_dir):
    manifest = verify(tiny_dir)
    assert manifest["build"]["train_steps"] == BuildConfig.tiny().steps
    model = LlavaForConditionalGeneration.from_pretrained(tiny_dir, dtype=torch.float32)
    processor = AutoProcessor.from_pretrained(tiny_dir)
    assert processor.tokenizer.padding_side == "left"  # batched generate() on the loaded testbed is right
    prompt = heldout_prompts("short", n=1, image_size=48)[0]
    inputs = prompt.inputs(processor)
    assert (inputs["input_ids"] == model.config.image_token_id).sum() == model.config.image_seq_length
    out = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    assert out.shape[1] > inputs["input_ids"].shape[1]
    report = json.loads((tiny_dir / "quality.json").read_text())
    assert set(report) >= {"vqa", "image_swap", "long", "gates", "build"}


def test_tiny_build_with_cards_reports_reading_and_draft_and_assistant_data_follow_it(tmp_path, monkeypatch):
    from specvlm_hf.benchmark.assistant_lm import assistant_conversations
    from specvlm_hf.training.cli import _testbed_rows

    with pytest.raises(ValueError, match="card_share"):
        BuildConfig.tiny(card_share=20)  # a percentage where a share is meant
    build_testbed(tmp_path / "tb", BuildConfig.tiny(card_share=0.5), progress=False)
    report = json.loads((tmp_path / "tb" / "quality.json").read_text())
    assert {"digit", "word", "text_colour"} <= set(report["vqa"]) and report["vqa"]["digit"]["n"] == 20
    assert 0.0 <= report["long"]["text_read"] <= 1.0
    assert report["build"]["config"]["card_share"] == 0.5
    monkeypatch.setenv(store.ENV_VAR, str(tmp_path / "tb"))
    rows, _ = _testbed_rows(tmp_path / "draft", 20, seed=1)  # the draft's data comes with cards too
    assert any("only a single" in a or "single digit" in a for r in rows for _, a in r.turns)
    for testbed, cards in ((None, True), (tmp_path / "tb", True), (tmp_path / "no-manifest", False)):
        conversations = assistant_conversations(20, seed=1, testbed_dir=testbed)  # None: the resolved testbed
        questions = [q.split("\n")[0] for _, turns in conversations for q, _ in turns]
        assert any(w in q for q in questions for w in ("digit", "word", "text")) == cards  # never about shapes


def test_build_is_reproducible_from_its_seed(tiny_dir, tmp_path):
    """Same config, same weights and tokenizer, byte for byte, at tiny sizes (full-size CPU builds share the
    tokenizer but not every weight bit, see the README); another seed differs."""
    files = ("model.safetensors", "tokenizer.json")
    build_testbed(tmp_path / "again", BuildConfig.tiny(), progress=False)
    assert [verify(tmp_path / "again")["files"][f] for f in files] == [verify(tiny_dir)["files"][f] for f in files]
    build_testbed(tmp_path / "other", BuildConfig.tiny(seed=1), progress=False)
    assert verify(tmp_path / "other")["files"]["model.safetensors"] != verify(tiny_dir)["files"]["model.safetensors"]


def test_load_testbed_explicit_path_and_env(tiny_dir, monkeypatch):
    model, processor = load_testbed(tiny_dir, build_if_missing=False)
    assert not model.training and model.dtype == torch.float32
    assert processor.tokenizer.eos_token == "</s>"
    monkeypatch.setenv(store.ENV_VAR, str(tiny_dir))
    assert resolve() == (tiny_dir, f"${store.ENV_VAR}")


def test_resolve_falls_back_to_user_cache(tmp_path, monkeypatch):
    monkeypatch.delenv(store.ENV_VAR, raising=False)
    monkeypatch.setattr(store, "SHIPPED_DIR", tmp_path / "absent")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert resolve() == (tmp_path / "cache" / "specvlm_hf" / "testbed", "user cache")
    with pytest.raises(TestbedError, match="testbed build"):
        load_testbed(build_if_missing=False)


def test_a_missing_testbed_is_never_built_unasked(tmp_path, monkeypatch):
    def build(*args, **kwargs):
        raise AssertionError("load_testbed started a build it was not asked for")

    monkeypatch.setattr(build_module, "build_testbed", build)
    with pytest.raises(TestbedError, match=r"about 40 minutes.*specvlm-hf testbed build --output .*build_if_missing"):
        load_testbed(tmp_path / "absent")
    assert not (tmp_path / "absent").exists()


def test_corrupted_or_unfinished_testbed_is_rejected(tiny_dir, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(tiny_dir, copy)
    weights = copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(TestbedError, match="checksum"):
        verify(copy)
    shutil.copytree(tiny_dir, copy, dirs_exist_ok=True)
    verify(copy)
    (copy / store.MANIFEST).unlink()
    with pytest.raises(TestbedError, match="no testbed.json"):
        load_testbed(copy, build_if_missing=False)


def test_interrupted_build_leaves_nothing_loadable(tmp_path, monkeypatch):
    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(build_module, "train", crash)
    with pytest.raises(KeyboardInterrupt):
        build_testbed(tmp_path / "tb", BuildConfig.tiny(), progress=False)
    assert list(tmp_path.iterdir()) == []


def test_failed_rebuild_keeps_the_previous_testbed(tiny_dir, tmp_path, monkeypatch):
    copy = tmp_path / "tb"
    shutil.copytree(tiny_dir, copy)

    def crash(*args, **kwargs):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(build_module, "train", crash)
    with pytest.raises(RuntimeError, match="out of memory"):
        build_testbed(copy, BuildConfig.tiny(), progress=False)
    verify(copy)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tb"]


@pytest.mark.skipif(not store.is_valid(store.SHIPPED_DIR), reason="no testbed shipped in this checkout")
def test_shipped_testbed_is_the_default(monkeypatch):
    monkeypatch.delenv(store.ENV_VAR, raising=False)
    assert resolve() == (store.SHIPPED_DIR, "shipped with the package")
    files = store.verify(store.SHIPPED_DIR)["files"]
    assert sum(f["bytes"] for f in files.values()) <= 36 * 2**20


def test_an_unknown_shipped_draft_is_named_with_the_known_ones():
    with pytest.raises(ValueError, match="'draft', 'specvlm-draft', 'eagle3-draft', 'draft-qwen2-vl'"):
        store.shipped_draft_dir("llava-draft")


def test_shipped_companions_belong_to_the_shipped_testbed_only(tmp_path):
    assert store.shipped_companion("draft", tmp_path) is None
    if (store.SHIPPED_DRAFT_DIR / "config.json").is_file():
        assert store.shipped_companion("draft", store.SHIPPED_DIR) == store.SHIPPED_DRAFT_DIR


@pytest.mark.skipif(
    not (store.is_valid(store.SHIPPED_DIR) and (store.SHIPPED_DRAFT_DIR / "config.json").is_file()),
    reason="no testbed and draft shipped in this checkout",
)
def test_shipped_draft_is_lossless_and_accepts_on_the_shipped_testbed(tmp_path, monkeypatch):
    """The shipped draft loads by name from any working directory (as after a plain `pip install`)."""
    from specvlm_hf import speculative_generate

    monkeypatch.chdir(tmp_path)
    target, processor = store.load_testbed(store.SHIPPED_DIR)
    draft = load_testbed_draft("draft", target)
    inputs = heldout_prompts("long", n=1)[0].inputs(processor)
    plain = target.generate(**inputs, max_new_tokens=48, do_sample=False)
    result = speculative_generate(target, draft, **inputs, max_new_tokens=48)
    assert torch.equal(result.sequences, plain)
    assert result.stats.mean_accepted_length > 2.0  # a trained draft; an untrained one stays near 1


@pytest.mark.skipif(
    not (store.is_valid(store.SHIPPED_DIR) and (store.SHIPPED_EAGLE3_DRAFT_DIR / "config.json").is_file()),
    reason="no testbed and EAGLE-3 draft shipped in this checkout",
)
@pytest.mark.parametrize(("tree", "floor"), [((5, 1, 6), 4.9), ((5, 4, 16), 5.6)], ids=["chain", "wide"])
def test_shipped_eagle3_draft_keeps_its_acceptance(tree, floor):
    """Tokens per verification step of the shipped EAGLE-3 draft on four held-out long prompts (96 new tokens), near
    what it reaches when shipped (5.07 for the chain, 5.76 for the tree), with output equal to plain greedy: a bug that
    feeds the draft the wrong target states keeps the output and drops this."""
    from specvlm_hf import speculative_generate
    from specvlm_hf.testbed import load_testbed_draft

    target, processor = store.load_testbed(store.SHIPPED_DIR)
    draft = load_testbed_draft("eagle3-draft", target)
    tokens = steps = 0
    for prompt in heldout_prompts("long", n=4):
        inputs = prompt.inputs(processor)
        depth, top_k, total = tree
        result = speculative_generate(
            target, draft, **inputs, max_new_tokens=96, depth=depth, tree_top_k=top_k, total_tokens=total
        )
        assert torch.equal(result.sequences, target.generate(**inputs, max_new_tokens=96, do_sample=False))
        tokens, steps = tokens + sum(result.stats.accepted_lengths), steps + len(result.stats.accepted_lengths)
    assert tokens / steps > floor


@pytest.mark.skipif(
    not (store.is_valid(store.SHIPPED_QWEN2_VL_DIR) and (store.SHIPPED_QWEN2_VL_DRAFT_DIR / "config.json").is_file()),
    reason="no Qwen2-VL testbed and draft shipped in this checkout",
)
def test_shipped_qwen2_vl_testbed_and_draft():
    """The shipped Qwen2-VL testbed is a stock Qwen2-VL under 25 MB of weights; its draft (the shipped companion of
    `--target testbed-qwen2-vl`) decodes losslessly through M-RoPE and is accepted."""
    from transformers import Qwen2VLForConditionalGeneration

    from specvlm_hf import SpecVLMDraftModel, speculative_generate

    manifest = store.verify(store.SHIPPED_QWEN2_VL_DIR)
    assert manifest["files"]["model.safetensors"]["bytes"] <= 25 * 10**6
    assert store.shipped_companion("draft", store.SHIPPED_QWEN2_VL_DIR) == store.SHIPPED_QWEN2_VL_DRAFT_DIR
    target, processor = load_testbed("testbed-qwen2-vl", build_if_missing=False)
    assert type(target) is Qwen2VLForConditionalGeneration
    draft = load_testbed_draft("draft", target)  # by the LLaVA testbed's name too: picked by the architecture
    assert isinstance(draft, SpecVLMDraftModel) and draft.config.name_or_path == str(store.SHIPPED_QWEN2_VL_DRAFT_DIR)
    with pytest.raises(ValueError, match="the Qwen2-VL testbed ships no 'specvlm-draft'; its one draft is 'draft'"):
        load_testbed_draft("specvlm-draft", target)
    inputs = heldout_prompts("long", n=1)[0].inputs(processor)
    plain = target.generate(**inputs, max_new_tokens=48, do_sample=False)
    result = speculative_generate(target, draft, **inputs, max_new_tokens=48)
    assert torch.equal(result.sequences, plain)
    assert torch.equal(target.generate(**inputs, max_new_tokens=48, assistant_model=draft), plain)
    assert result.stats.mean_accepted_length > 2.0


def test_training_data_is_deterministic_and_disjoint_from_heldout():
    def snapshot(seed):
        return [(c.image.tobytes(), c.turns) for c in training_conversations(6, seed, image_size=48)]

    assert snapshot(0) == snapshot(0)
    assert snapshot(0) != snapshot(1)
    heldout = {p.scene.key for p in heldout_prompts()}
    assert all(c.scene.key not in heldout for c in training_conversations(300, seed=3, image_size=48))
    assert [p.question for p in heldout_prompts(n=20)] == [p.question for p in heldout_prompts(n=20)]


def test_heldout_prompts_cover_kinds_and_long_answers_are_long():
    short, long = heldout_prompts("short", cards=True), heldout_prompts("long", cards=True)
    assert heldout_prompts() == [p for p in heldout_prompts(cards=True) if p.scene.text is None]
    assert {p.category for p in short} >= set(OPTIONS) | {"caption"}
    assert all(p.key in OPTIONS[p.category] for p in short if p.key is not None)
    assert min(len(p.reference.split()) for p in long) > 100
    cards = [p for p in long if p.scene.text is not None]
    assert len(cards) == 40 and {p.scene.text.kind for p in cards} == {"digit", "word"}
    assert {p.category for p in short if p.scene.text is not None} == set(CARD_CATEGORIES) | {"caption"}
    with pytest.raises(ValueError, match="kind"):
        heldout_prompts("medium")


@pytest.mark.skipif(not store.is_valid(store.SHIPPED_DIR), reason="no testbed shipped in this checkout")
@pytest.mark.parametrize("name", ["testbed", "testbed-qwen2-vl"])
def test_the_default_config_still_draws_the_shipped_builds_data(name):
    """The recipe (`BuildConfig()`, `BuildConfig.qwen2_vl()`) is the shipped build's, and the tokenizer, trained on
    3,000 conversations of the build's seed, comes out equal: the recipe draws the same text as that build. (The
    LLaVA build's manifest predates the `architecture` field.)"""
    directory, cfg = (store.SHIPPED_DIR, BuildConfig()) if name == "testbed" else (store.SHIPPED_QWEN2_VL_DIR,
                                                                                    BuildConfig.qwen2_vl())  # fmt: skip
    if not store.is_valid(directory):
        pytest.skip(f"no {name} shipped in this checkout")
    assert {"architecture": "llava"} | store.build_config(directory) == dataclasses.asdict(cfg)
    shipped = json.loads((directory / "tokenizer.json").read_text())["model"]
    rebuilt = json.loads(build_module.make_processor(cfg).tokenizer.backend_tokenizer.to_str())["model"]
    assert (rebuilt["vocab"], rebuilt["merges"]) == (shipped["vocab"], shipped["merges"])


@pytest.mark.skipif(not store.is_valid(store.SHIPPED_DIR), reason="no testbed shipped in this checkout")
def test_long_references_are_at_least_128_tokens_of_the_shipped_tokenizer():
    tokenizer = AutoProcessor.from_pretrained(store.SHIPPED_DIR).tokenizer
    long = heldout_prompts("long", cards=True)
    lengths = [len(tokenizer(" " + p.reference, add_special_tokens=False).input_ids) for p in long]
    assert min(lengths) >= 128


def test_object_details_keep_their_order():
    """Each object's detail sentences are a subset of (shape, colour, size, position) in that order, so a
    description never comes back to a detail it has passed (the loops the first testbeds fell into)."""
    for seed in range(200):
        rng = random.Random(seed)
        scene = sample_scene(rng)
        for index in range(len(scene.objects)):
            details = _object_sentences(scene, index, [3, 1], rng, set())[1:]
            kinds = [_detail_phrasing(d)[0] for d in details]
            assert kinds == [1, 3], details


def _detail_phrasing(sentence: str) -> tuple[int, str] | None:
    """(kind, phrasing) of a detail sentence of a long description, or None for any other sentence."""
    wheres = ["top edge", "bottom edge", "left edge", "right edge"] + [
        f"{v} and {h} edges" for v in ("top", "bottom") for h in ("left", "right")
    ]
    phrasings = [(0, t) for shape in SHAPES for t in _SHAPE_DETAILS[shape]]
    phrasings += [(1, t) for t in _COLOUR_DETAILS if any(t.format(colour=c) == sentence for c in COLOURS)]
    phrasings += [(2, t) for size in _SIZE_DETAILS for t in _SIZE_DETAILS[size]]
    phrasings += [(3, t) for t in _CENTER_DETAILS]
    phrasings += [(3, t) for t in _EDGE_DETAILS if any(t.format(where=w) == sentence for w in wheres)]
    # the formatted phrasings were kept only where they match the sentence
    return next(((k, t) for k, t in phrasings if "{" in t or t == sentence), None)


def test_long_descriptions_say_each_detail_kind_at_most_twice_and_never_reuse_a_phrasing():
    """Greedy decoding copies the likeliest phrasing each time, so the references must not repeat one: detail
    kinds rotate over the objects (each kind at most twice) and each phrasing is said at most once."""
    for seed in range(300):
        rng = random.Random(seed)
        sentences = [s.strip() + "." for s in long_turn(sample_scene(rng), rng).answer.split(". ")]
        details = [d for d in map(_detail_phrasing, sentences) if d is not None]
        assert details, sentences
        assert max(Counter(k for k, _ in details).values()) <= 2, sentences
        assert max(Counter(details).values()) == 1, sentences


def test_training_conversations_favour_the_harder_questions():
    convs = list(training_conversations(300, seed=5, image_size=48, card_share=0.2))
    counts = Counter(t.category for c in convs for t in c.turns if t.key is not None)
    assert counts["colour"] > 2 * counts["count"] and counts["relation"] > counts["shape"]
    assert set(counts) == set(SHORT_CATEGORIES + CARD_CATEGORIES) == set(TRAIN_WEIGHTS)
    assert 30 < sum(c.scene.text is not None for c in convs) < 90
    assert not any(c.scene.text for c in training_conversations(300, seed=5, image_size=48))  # card_share=0


def test_cards_render_their_text_inside_its_box():
    rng = random.Random(0)
    for kind in ("digit", "word") * 10:
        scene = sample_card(rng, kind)
        image = render_scene(scene, 144)
        assert scene.text.kind == kind and not scene.objects
        ink = [(x, y) for x in range(144) for y in range(144) if image.getpixel((x, y)) != (255, 255, 255)]
        left, top, right, bottom = (round(v * 144) for v in text_box(scene))
        assert ink and all(left <= x < right and top <= y < bottom for x, y in ink)
        cells = Counter((y // 16, x // 16) for x, y in ink)  # the image tokens of the 144 px testbed
        text = scene.text
        assert set(cells) == {(text.row, text.col + i) for i in range(len(text.characters))}  # one per character
        r, g, b = (sum(image.getpixel(p)[i] for p in ink) / len(ink) for i in range(3))
        assert max(abs(a - c) for a, c in zip((r, g, b), COLOURS[scene.text.colour])) <= 12  # the colour jitter
        assert render_scene(scene, 144).tobytes() == image.tobytes()
    first, again = (sample_card(random.Random(1), "digit") for _ in range(2))
    assert first == again  # deterministic in the rng
    with pytest.raises(ValueError, match="kind"):
        sample_card(rng, "letter")


def test_card_questions_ask_about_the_text_and_shape_questions_skip_cards():
    rng = random.Random(3)
    for _ in range(100):
        card, shapes = sample_card(rng), sample_scene(rng)
        state = rng.getstate()
        assert all(short_turn(card, c, rng) is None for c in SHORT_CATEGORIES)
        assert all(short_turn(shapes, c, rng) is None for c in CARD_CATEGORIES)
        assert rng.getstate() == state  # a question that does not apply draws nothing
        other = "word" if card.text.kind == "digit" else "digit"
        assert short_turn(card, other, rng) is None
        read, colour = short_turn(card, card.text.kind, rng), short_turn(card, "text_colour", rng)
        assert read.key == card.text.content and quality.is_correct(read.answer, read.key, OPTIONS[read.category])
        assert colour.key == card.text.colour and quality.is_correct(colour.answer, colour.key, OPTIONS["colour"])
        assert card.text.content in caption_turn(card, rng).answer
        assert quality.reads_text(long_turn(card, rng).answer, card)


def test_patch_labels_mark_each_character_of_a_card():
    scene = sample_card(random.Random(2), "word")
    text = scene.text
    labels = patch_labels(scene, 9)  # [81, 4]: one text cell per image token at the testbed's size
    covered = torch.nonzero(labels[:, 1] > 0).flatten().tolist()
    assert covered == [9 * text.row + text.col + i for i in range(len(text.content))]
    assert [CHARACTERS[v - len(SHAPES) - 1] for v in labels[covered, 1].tolist()] == list(text.content)
    assert set(labels[covered, 0].tolist()) == {list(COLOURS).index(text.colour) + 1}
    assert set(labels[covered, 2].tolist()) == {0}  # no size
    assert 1 <= int((patch_labels(scene, 3)[:, 1] > 0).sum()) <= len(text.content)


@pytest.mark.parametrize("arch", ["llava", "qwen2_vl"])
def test_packed_training_blocks_match_single_prompts(arch, tiny_dir, tiny_qwen_dir):
    """Every packed question block sees what the processor gives for that question alone, at the same positions
    (for Qwen2-VL the M-RoPE positions `get_rope_index` gives): the packed logits equal the single prompts'."""
    model, processor = load_testbed(tiny_dir if arch == "llava" else tiny_qwen_dir, build_if_missing=False)
    cfg = BuildConfig.tiny(architecture=arch, batch_size=1)
    batch = make_batch(cfg, step=0, processor=processor, image_seq_length=9)
    ids = batch.input_ids[0][batch.input_ids[0] != processor.tokenizer.pad_token_id].tolist()
    conv = next(
        c
        for c in (
            sample_conversation(
                cfg.seed, 0, with_long=w, image_size=48, max_short=cfg.max_short, card_share=cfg.card_share
            )  # fmt: skip
            for w in (False, True)
        )
        if encode_conversation(c, processor.tokenizer, 9, arch)[0] == ids
    )
    ids, labels, blocks = encode_conversation(conv, processor.tokenizer, 9, arch)
    if arch == "llava":
        assert torch.allclose(clip_pixel_values([conv.image], processor.image_processor), batch.vision["pixel_values"],
                              atol=1e-6)  # fmt: skip
    with torch.no_grad():
        packed = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                       position_ids=batch.position_ids, **batch.vision).logits[0]  # fmt: skip
    for k, turn in enumerate(conv.turns, start=1):
        messages = [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": turn.question}]},
            {"role": "assistant", "content": [{"type": "text", "text": turn.answer}]},
        ]
        single = processor(images=conv.image, text=processor.apply_chat_template(messages), return_tensors="pt")
        rows = [i for i, b in enumerate(blocks) if b in (0, k)]
        # the template ends a Qwen2-VL turn with "<|im_end|>\n"; the packed block stops at <|im_end|>
        assert single["input_ids"][0].tolist()[: len(rows)] == [ids[i] for i in rows]
        with torch.no_grad():
            logits = model(**single).logits[0][: len(rows)]
        torch.testing.assert_close(packed[rows], logits, atol=1e-4, rtol=1e-4)
    answer = [t for t, lab in zip(ids, labels) if lab != -100]
    assert processor.tokenizer.decode(answer).count(processor.tokenizer.eos_token) == len(conv.turns)


def test_qwen2_vl_prefix_positions_are_get_rope_index(tiny_qwen_dir):
    model, processor = load_testbed(tiny_qwen_dir, build_if_missing=False)
    prompt = heldout_prompts("short", n=1, image_size=48)[0]
    inputs = prompt.inputs(processor)
    positions, _ = model.model.get_rope_index(
        inputs["input_ids"], inputs["mm_token_type_ids"], image_grid_thw=inputs["image_grid_thw"]
    )  # [3, 1, L]
    ids = inputs["input_ids"][0].tolist()
    prefix = ids[: ids.index(processor.tokenizer.convert_tokens_to_ids("<|vision_end|>")) + 1]
    assert prefix == Qwen2VLTestbed.prefix_ids(processor.tokenizer, 9)
    ours = Qwen2VLTestbed.prefix_positions(prefix, processor.tokenizer, side=3)
    assert torch.equal(ours, positions[:, 0, : len(prefix)])


def test_tiny_qwen2_vl_testbed_loads_as_stock_qwen2_vl_and_generates(tiny_qwen_dir):
    from transformers import Qwen2VLForConditionalGeneration

    from specvlm_hf.testbed.architectures import ImageQwen2VLProcessor

    model, processor = load_testbed(tiny_qwen_dir, build_if_missing=False)
    assert type(model) is Qwen2VLForConditionalGeneration and isinstance(processor, ImageQwen2VLProcessor)
    assert processor.tokenizer.eos_token == "<|im_end|>" and processor.tokenizer.padding_side == "left"
    inputs = heldout_prompts("short", n=1, image_size=48)[0].inputs(processor)
    assert inputs["image_grid_thw"].tolist() == [[1, 6, 6]]  # 6 x 6 patches of 8 px, merged 2 x 2: 9 tokens
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == 9
    out = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    assert out.shape[1] > inputs["input_ids"].shape[1]
    assert verify(tiny_qwen_dir)["build"]["config"]["architecture"] == "qwen2_vl"
    with pytest.raises(ValueError, match="images only"):
        processor(text="x", videos=[inputs["pixel_values"]])
    with pytest.raises(ValueError, match="'llava', 'qwen2_vl'"):
        BuildConfig.tiny(architecture="qwen2")
    with pytest.raises(ValueError, match="even patch_size"):
        BuildConfig.tiny(architecture="qwen2_vl", patch_size=15, image_size=45)


def test_named_testbeds_resolve_and_only_testbeds_count_as_testbeds(tiny_qwen_dir, tmp_path, monkeypatch):
    monkeypatch.delenv(store.ENV_VAR, raising=False)
    assert resolve("testbed-qwen2-vl") == (store.SHIPPED_QWEN2_VL_DIR, "shipped with the package")
    assert resolve("testbed")[0] == resolve()[0]
    assert (
        store.is_testbed("testbed") and store.is_testbed("testbed-qwen2-vl") and store.is_testbed(str(tiny_qwen_dir))
    )
    assert not store.is_testbed(str(tmp_path)) and not store.is_testbed("llava-hf/llava-1.5-7b-hf")
    assert store.shipped_companion("specvlm-draft", store.SHIPPED_QWEN2_VL_DIR) is None  # only a draft ships


def test_patch_labels_mark_object_tokens():
    conv = next(c for i in range(10) if not (c := sample_conversation(0, i, with_long=False)).scene.text)
    labels = patch_labels(conv.scene, 9)  # [81, 4]
    covered = (labels[:, 0] > 0).view(9, 9)
    for o in conv.scene.objects:
        assert covered[3 * o.row + 1, 3 * o.col + 1]
    assert int(covered.sum()) <= 9 * len(conv.scene.objects)
    assert labels[:, 3].tolist()[:9] == [0, 0, 0, 1, 1, 1, 2, 2, 2]


def test_answer_scoring_and_chance():
    options = OPTIONS["position"]
    assert quality.is_correct("It is in the top left.", "top left", options)
    assert not quality.is_correct("Top left or bottom right.", "top left", options)
    assert not quality.is_correct("Nothing.", "top left", options)
    assert quality.is_correct("No, there is not.", "no", OPTIONS["exists"])
    assert quality.chance_level(["yes", "yes", "no", "yes"]) == 0.75


def test_vqa_scores_on_fixture():
    prompts = [p for p in heldout_prompts("short") if p.category == "count"][:4]
    answers = [quality.Generation(f"There are {p.key} objects.", (), True) for p in prompts[:3]]
    answers.append(quality.Generation("Seven.", (), True))
    scores = quality.vqa_scores(prompts, answers)
    assert scores["count"]["accuracy"] == 0.75 and scores["overall"]["n"] == 4
    assert scores["count"]["chance"] == quality.chance_level([p.key for p in prompts])


def test_loop_detector_is_relative_to_references():
    references = [list(range(40)) + list(range(10)), list(range(100, 160))]  # one repeat of a 10-gram
    looping = list(range(5)) + [7, 8, 9, 10] * 20
    varied = list(range(200, 260)) + list(range(200, 208))  # repeats an 8-gram twice, like the first reference
    assert quality.loop_flags([looping, varied], references) == [True, False]
    twice = list(range(300, 340)) + list(range(300, 308)) + list(range(400, 440)) + list(range(400, 408))
    assert quality.loop_flags([twice], references) == [False]  # two 8-grams said twice each: not a loop
    assert quality.loop_flags([twice], [list(range(60))], repeats=2) == [True]  # but more than any reference
    assert quality.max_ngram_repeat([1, 2, 3], n=8) == 0


def test_length_stats_and_object_recall():
    gens = [quality.Generation("a", (1,) * n, ended) for n, ended in ((3, True), (5, True), (10, False))]
    stats = quality.length_stats(gens)
    assert (stats["min"], stats["median"], stats["max"]) == (3, 5, 10)
    assert stats["ended_with_eos"] == pytest.approx(2 / 3)
    scene = heldout_prompts("long", n=1)[0].scene
    first = scene.objects[0]
    absent = next(
        f"{c} {s}" for c in COLOURS for s in SHAPES if all((o.colour, o.shape) != (c, s) for o in scene.objects)
    )
    recall, precision = quality.object_recall(f"A {first.colour} {first.shape} and a {absent}.", scene)
    assert (recall, precision) == (pytest.approx(1 / len(scene.objects)), 0.5)
    card = Scene((), 0, Text("two", "red", 0, 0))
    assert quality.reads_text("The digit is two. It comes right after one.", card)
    assert not quality.reads_text("The digit is one. It comes right before two.", card)
    assert not quality.reads_text("A red digit.", card)


def test_export_llava_jsonl(tmp_path):
    path = export_llava_jsonl(tmp_path, n=3, seed=5, image_size=48)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    convs = list(training_conversations(3, seed=5, image_size=48))
    assert len(rows) == sum(len(c.turns) for c in convs)
    assert len({r["image"] for r in rows}) == 3 and all((tmp_path / r["image"]).is_file() for r in rows)
    human, gpt = rows[0]["conversations"]
    assert (human["from"], gpt["from"]) == ("human", "gpt")
    assert human["value"] == "<image>\n" + convs[0].turns[0].question and gpt["value"] == convs[0].turns[0].answer


def test_cli_path_and_tiny_build(tmp_path, monkeypatch, capsys):
    from specvlm_hf.cli import main

    monkeypatch.setenv(store.ENV_VAR, str(tmp_path / "tb"))
    assert main(["testbed", "path"]) == 0
    assert "not built yet" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="card_share .* got 20.0"):
        main(["testbed", "build", "--tiny", "--output", str(tmp_path / "tb"), "--card-share", "20"])
    assert not (tmp_path / "tb").exists()
    assert main(["testbed", "build", "--tiny", "--quiet", "--output", str(tmp_path / "tb"), "--steps", "2"]) == 0
    assert verify(tmp_path / "tb")["build"]["train_steps"] == 2
