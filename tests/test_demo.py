"""The Gradio demo (`demo/app.py`) on the shipped testbed: the event handler, bad input, the app served over HTTP and
driven with `gradio_client`, and the page in headless Chromium driven by Playwright."""

import importlib.util
import os
import re
import socket
import sys
from pathlib import Path

import pytest
import torch

gr = pytest.importorskip("gradio", reason="the demo needs gradio: pip install -e '.[test]'")

APP = Path(__file__).resolve().parent.parent / "demo" / "app.py"


def _load_app():
    spec = importlib.util.spec_from_file_location("specvlm_demo_app", APP)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def app():
    return _load_app()


@pytest.fixture(scope="module")
def testbed_demo(app):
    target, processor, draft, examples = app.load(None, None)
    return app, app.Demo(target, processor, draft), examples


def _final(handler_output):
    updates = list(handler_output)
    return updates[-1] if updates else None


def test_greedy_run_streams_both_panes_and_they_are_identical(testbed_demo):
    app, demo, examples = testbed_demo
    image, question = examples[0]
    updates = list(demo.run(image, question, 0.0, "auto", 48))
    assert len(updates) >= 2  # streamed, not one final answer
    plain_text, plain_figures, spec_pieces, spec_figures, summary, plot = updates[-1]
    assert plain_text and "".join(text for text, _ in spec_pieces) == plain_text
    assert {label for _, label in spec_pieces} <= set(app.LABELS.values())
    assert app.LABELS["draft"] in {label for _, label in spec_pieces}  # the trained draft gets tokens accepted
    assert "identical" in summary and "tau" in summary and "tokens/s" in spec_figures
    assert plot is not None


def test_highlighting_follows_the_steps(app):
    class Tokenizer:
        def decode(self, tokens, skip_special_tokens=True):
            return " ".join(str(t) for t in tokens)

    run = app.Run(tokens=[5, 6, 7, 8, 9], done=True, accepted_lengths=[3, 1])
    pieces = app.highlighted(Tokenizer(), run)
    draft, target = app.LABELS["draft"], app.LABELS["target"]
    assert [label for _, label in pieces] == [target, draft, draft, target, target]
    assert "".join(text for text, _ in pieces) == "5 6 7 8 9"


@pytest.mark.parametrize(
    ("image", "question", "tree", "max_new_tokens", "message"),
    [
        (None, "What is this?", "auto", 16, "Upload an image"),
        ("image", "  ", "auto", 16, "Ask a question"),
        ("image", "What?", "5,x,6", 16, "Tree must be"),
        ("image", "What?", "auto", 0, "Max new tokens"),
    ],
)
def test_bad_input_gets_a_clear_error(testbed_demo, image, question, tree, max_new_tokens, message):
    app, demo, examples = testbed_demo
    image = examples[0][0] if image == "image" else image
    with pytest.raises(gr.Error, match=message):
        _final(demo.run(image, question, 0.0, tree, max_new_tokens))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_served_app_answers_over_http(testbed_demo, tmp_path):
    from gradio_client import Client, handle_file

    app, demo, examples = testbed_demo
    image_path = tmp_path / "example.png"
    examples[0][0].save(image_path)
    blocks = app.build_demo(demo.target, demo.processor, demo.draft, examples)
    port = _free_port()
    blocks.launch(server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        client = Client(f"http://127.0.0.1:{port}/", verbose=False)
        plain_text, _, spec, _, summary, _ = client.predict(
            handle_file(str(image_path)), examples[0][1], 0.0, "auto", 32, api_name="/generate"
        )
        spec_text = "".join(piece["token"] for piece in spec) if isinstance(spec, list) else spec
        assert plain_text and plain_text == spec_text and "identical" in summary
        with pytest.raises(Exception, match="Upload an image"):
            client.predict(None, "What?", 0.0, "auto", 8, api_name="/generate")
        # The app keeps serving after bad input.
        assert client.predict(handle_file(str(image_path)), "What?", 0.0, "auto", 4, api_name="/generate")[0]
    finally:
        blocks.close()
    torch.set_num_threads(2)


CHROMIUM = Path(os.environ.get("SPECVLM_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"


def test_demo_in_a_real_browser(testbed_demo):
    """Open the page in headless Chromium, pick an example, run at T = 0, wait for both panes, check the texts are
    equal and the figures are numbers; the screenshot lands in test-artifacts/demo.png."""
    playwright = pytest.importorskip("playwright.sync_api", reason="pip install -e '.[test]' installs playwright")
    if not CHROMIUM.exists():
        pytest.skip(f"no Chromium at {CHROMIUM}: `apt-get install -y chromium` (or set SPECVLM_CHROMIUM) to run it")
    app, demo, examples = testbed_demo
    blocks = app.build_demo(demo.target, demo.processor, demo.draft, examples)
    port = _free_port()
    blocks.launch(server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        with playwright.sync_playwright() as driver:
            browser = driver.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_FLAGS)
            page = browser.new_page(viewport={"width": 1400, "height": 1200})
            page.goto(f"http://127.0.0.1:{port}/")
            page.locator('#examples [data-testid="dataset-cell-0-0"]').click()
            page.locator("#input-image img").first.wait_for(state="visible", timeout=30_000)
            page.locator("#max-new-tokens input[type=number]").fill("48")
            page.locator("#max-new-tokens input[type=number]").press("Enter")
            page.locator("#generate").click()
            page.wait_for_function(
                "document.querySelector('#summary') && document.querySelector('#summary').innerText.includes('tau')",
                timeout=120_000,
            )
            summary = page.locator("#summary").inner_text()
            plain = page.locator("#plain-text textarea").input_value()
            spec = page.locator("#spec-text").inner_text()
            ARTIFACTS.mkdir(exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "demo.png"), full_page=True)
            browser.close()
    finally:
        blocks.close()
        torch.set_num_threads(2)
    assert re.search(r"tau: \*?\*?[0-9.]+x", summary.replace("**", "")) or re.search(r"[0-9.]+x", summary)
    assert re.search(r"sigma: [0-9.]+", summary.replace("**", ""))
    assert "identical" in summary
    # The highlighted pane lays tokens out as separate spans (the browser's text adds spaces between some of them).
    squeeze = lambda text: re.sub(r"\s+", "", text)  # noqa: E731
    assert len(plain.split()) >= 5 and squeeze(plain) in squeeze(spec)


def test_a_model_that_cannot_be_loaded_stops_with_a_clear_message(app, tmp_path):
    with pytest.raises(SystemExit, match="Could not load model"):
        app.main(["--model", str(tmp_path / "no-such-llava"), "--draft", str(tmp_path / "no-such-draft")])
    with pytest.raises(SystemExit, match="needs --draft"):
        app.main(["--model", str(tmp_path / "no-such-llava")])


@pytest.mark.parametrize(
    ("environ", "argv", "port"),
    [
        ({}, [], 7860),
        ({"PORT": "8001"}, [], 8001),
        ({"GRADIO_SERVER_PORT": "8002"}, [], 8002),
        ({"GRADIO_SERVER_PORT": "8002", "PORT": "8001"}, [], 8002),  # Gradio's own variable first
        ({"GRADIO_SERVER_PORT": "8002"}, ["--port", "8003"], 8003),  # the flag over any variable
    ],
)
def test_the_port_follows_the_flag_then_gradios_variable_then_port(app, monkeypatch, environ, argv, port):
    for name in ("GRADIO_SERVER_PORT", "PORT"):
        monkeypatch.delenv(name, raising=False)
    for name, value in environ.items():
        monkeypatch.setenv(name, value)
    assert app.parse_args(argv).port == port
