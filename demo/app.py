"""The specvlm_hf demo: the same question through plain `generate()` and through `generate(assistant_model=draft)`,
one after the other (they never share the CPU or GPU at once), each streaming its text with live tokens/s; then the
speedup tau, the mean accepted length sigma, the target forwards, whether the texts are identical, the speculative
text coloured by where each token came from (a draft token the target accepted, or the target's own token), and the
accepted-length histogram.

    python demo/app.py                                          # the shipped testbed, on CPU
    python demo/app.py --model llava-hf/llava-1.5-7b-hf --draft ORG/DRAFT   # a real LLaVA (GPU when there is one)

`SPECVLM_DEMO_MODEL` / `SPECVLM_DEMO_DRAFT` set the same as the flags (a Space's variables). The port is `--port`,
else `GRADIO_SERVER_PORT` (Gradio's own variable), else `PORT`, else 7860; the host `--host`, else
`GRADIO_SERVER_NAME`, else 127.0.0.1.
"""

from __future__ import annotations

import argparse
import os
import queue
import threading
import time
from dataclasses import dataclass, field

import gradio as gr
import torch
from transformers.generation.streamers import BaseStreamer

from specvlm_hf import SpecVLMDraftModel, speculative_generate

MAX_NEW_TOKENS = 512
LABELS = {"draft": "draft token, accepted", "target": "target's own token"}


class _TokenQueue(BaseStreamer):
    """Receives generated token ids (after the prompt, which `generate()` streams first) into a queue."""

    def __init__(self):
        self.tokens: queue.Queue = queue.Queue()
        self.prompt_seen = False

    def put(self, value):
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        for token in value.reshape(-1).tolist():
            self.tokens.put(token)

    def end(self):
        self.tokens.put(None)


@dataclass
class Run:
    """One generation as it streams: its tokens so far, its clock, and at the end its statistics."""

    tokens: list[int] = field(default_factory=list)
    started: float = 0.0
    seconds: float = 0.0
    done: bool = False
    error: str | None = None
    accepted_lengths: list[int] | None = None
    target_forwards: int | None = None

    @property
    def tokens_per_second(self) -> float:
        return len(self.tokens) / self.seconds if self.seconds > 0 else 0.0


def stream(generate, poll: float = 0.1):
    """Runs `generate(streamer)` in a thread and yields its `Run` every `poll` seconds and once at the end."""
    streamer, run = _TokenQueue(), Run(started=time.perf_counter())
    result = {}

    def work():
        try:
            result["value"] = generate(streamer)
        except Exception as error:  # shown in the page; the app keeps serving
            run.error = f"{type(error).__name__}: {error}"
            streamer.end()

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    finished = False
    while not finished:
        deadline = time.perf_counter() + poll
        while time.perf_counter() < deadline:
            try:
                token = streamer.tokens.get(timeout=max(deadline - time.perf_counter(), 1e-3))
            except queue.Empty:
                break
            if token is None:
                finished = True
                break
            run.tokens.append(token)
        run.seconds = time.perf_counter() - run.started
        if not finished:
            yield run
    thread.join()
    run.seconds = time.perf_counter() - run.started
    value = result.get("value")
    if value is not None and hasattr(value, "stats"):
        run.accepted_lengths, run.target_forwards = value.stats.accepted_lengths, value.stats.target_forwards
    elif value is not None:
        run.target_forwards = len(run.tokens)  # plain decoding: one forward per token
    run.done = True
    yield run


def token_texts(tokenizer, tokens: list[int]) -> list[str]:
    """The text each token adds (decoding prefixes, so that word boundaries come out right)."""
    texts, previous = [], ""
    for i in range(len(tokens)):
        text = tokenizer.decode(tokens[: i + 1], skip_special_tokens=True)
        texts.append(text[len(previous) :])
        previous = text
    return texts


def highlighted(tokenizer, run: Run) -> list[tuple[str, str | None]]:
    """The speculative text as (text, label) pieces: the first token and the last of every step are the target's
    own; the others are draft tokens the target accepted."""
    texts = token_texts(tokenizer, run.tokens)
    if not run.done or run.accepted_lengths is None:
        return [("".join(texts), None)]
    labels = [LABELS["target"]]
    for n in run.accepted_lengths:
        labels += [LABELS["draft"]] * (n - 1) + [LABELS["target"]]
    return list(zip(texts, labels[: len(texts)]))


def parse_tree(text: str) -> dict:
    """`"auto"` or `"depth,top_k,total_tokens"` -> `speculative_generate` knobs."""
    text = (text or "auto").strip().lower()
    if text == "auto":
        return {}
    try:
        depth, top_k, total = (int(part) for part in text.split(","))
    except ValueError:
        raise gr.Error(
            f"Tree must be 'auto' or three integers 'depth,top_k,total_tokens' (e.g. 6,1,7), got {text!r}."
        ) from None
    if not (1 <= depth <= 16 and 1 <= top_k <= 16 and 2 <= total <= 256):
        raise gr.Error("Tree knobs out of range: depth 1-16, top_k 1-16, total_tokens 2-256.")
    return {"depth": depth, "tree_top_k": top_k, "total_tokens": total}


class Demo:
    """The models and the event handler."""

    def __init__(self, target, processor, draft):
        self.target, self.processor, self.draft = target, processor, draft

    def inputs(self, image, question: str) -> dict:
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        text = self.processor.apply_chat_template(messages, add_generation_prompt=True)
        try:
            inputs = self.processor(images=image.convert("RGB"), text=text, return_tensors="pt")
        except Exception as error:
            raise gr.Error(f"Could not read the image: {error}") from error
        dtype = next(self.target.parameters()).dtype
        return {k: v.to(self.target.device, dtype) if k == "pixel_values" else v.to(self.target.device)
                for k, v in inputs.items()}  # fmt: skip

    def run(self, image, question, temperature, tree, max_new_tokens):
        """Plain, then speculative; yields (plain text, plain figures, speculative text, speculative figures,
        summary, histogram) as they stream."""
        if image is None:
            raise gr.Error("Upload an image (or pick an example): the question is about an image.")
        if not (question or "").strip():
            raise gr.Error("Ask a question about the image.")
        max_new_tokens = int(max_new_tokens)
        if not 1 <= max_new_tokens <= MAX_NEW_TOKENS:
            raise gr.Error(f"Max new tokens must be between 1 and {MAX_NEW_TOKENS}.")
        knobs = parse_tree(tree)
        inputs = self.inputs(image, question.strip())
        temperature = float(temperature)
        sampling = dict(temperature=temperature, top_k=0, top_p=1.0) if temperature > 0 else {}
        common = dict(max_new_tokens=max_new_tokens, do_sample=temperature > 0, **sampling)
        tokenizer = self.processor.tokenizer
        seed = int(time.time())

        def plain(streamer):
            torch.manual_seed(seed)
            return self.target.generate(**inputs, **common, streamer=streamer)

        def speculative(streamer):
            torch.manual_seed(seed)
            return speculative_generate(self.target, self.draft, **inputs, **common, **knobs, streamer=streamer)

        empty = ("", "", [], "", "", None)
        plain_run = Run()
        for plain_run in stream(plain):
            text = tokenizer.decode(plain_run.tokens, skip_special_tokens=True)
            yield (text, figures(plain_run), *empty[2:])
            if plain_run.error:
                raise gr.Error(f"Plain generate() failed: {plain_run.error}")
        plain_text = tokenizer.decode(plain_run.tokens, skip_special_tokens=True)
        for spec_run in stream(speculative):
            if spec_run.error:
                raise gr.Error(f"Speculative generate() failed: {spec_run.error}")
            done = spec_run.done
            yield (
                plain_text, figures(plain_run), highlighted(tokenizer, spec_run), figures(spec_run),
                summary(plain_run, spec_run, temperature) if done else "", histogram(spec_run) if done else None,
            )  # fmt: skip


def figures(run: Run) -> str:
    state = "done" if run.done else "generating..."
    line = f"**{len(run.tokens)} tokens, {run.seconds:.2f} s, {run.tokens_per_second:.1f} tokens/s** ({state})"
    if run.done and run.target_forwards:
        line += f"; target forwards: {run.target_forwards}"
    return line


def summary(plain: Run, spec: Run, temperature: float) -> str:
    tau = plain.seconds / spec.seconds * len(spec.tokens) / max(len(plain.tokens), 1) if spec.seconds else 0.0
    sigma = len(spec.tokens) / spec.target_forwards if spec.target_forwards else 0.0
    if temperature == 0:
        same = "identical" if plain.tokens == spec.tokens else "DIFFERENT (please report this)"
        equality = f"texts: **{same}** (greedy decoding is lossless)"
    else:
        equality = "texts differ by design at T > 0 (both are samples of the target's distribution)"
    return (
        f"speedup tau: **{tau:.2f}x** (tokens/s over plain) | mean accepted length sigma: **{sigma:.2f}** tokens per "
        f"target forward | target forwards: {plain.target_forwards} plain vs {spec.target_forwards} | {equality}"
    )


def histogram(run: Run):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = run.accepted_lengths or []
    fig, ax = plt.subplots(figsize=(5, 2.6))
    if lengths:
        ax.hist(lengths, bins=range(1, max(lengths) + 2), align="left", rwidth=0.85)
    ax.set_xlabel("tokens per verification step")
    ax.set_ylabel("steps")
    fig.tight_layout()
    plt.close(fig)
    return fig


def build_demo(target, processor, draft, examples: list[list] | None = None) -> gr.Blocks:
    demo_state = Demo(target, processor, draft)
    with gr.Blocks(title="specvlm_hf: same answer, faster") as demo:
        gr.Markdown(
            "# specvlm_hf: the same answer, faster\nPlain `generate()` runs first, then "
            "`generate(assistant_model=draft)`: one after the other, so neither slows the other down."
        )
        with gr.Row():
            image = gr.Image(type="pil", label="Image", elem_id="input-image")
            with gr.Column():
                question = gr.Textbox(label="Question", value="Describe the image in detail.")
                temperature = gr.Slider(0.0, 1.5, value=0.0, step=0.1, label="Temperature (0 = greedy)")
                tree = gr.Textbox(label="Tree: auto, or depth,top_k,total_tokens", value="auto")
                max_new_tokens = gr.Slider(
                    1, MAX_NEW_TOKENS, value=256, step=1, label="Max new tokens", elem_id="max-new-tokens"
                )
                button = gr.Button("Generate", variant="primary", elem_id="generate")
        with gr.Row():
            with gr.Column():
                gr.Markdown("### Plain `generate()`")
                plain_text = gr.Textbox(label="Plain", lines=8, elem_id="plain-text")
                plain_figures = gr.Markdown(elem_id="plain-figures")
            with gr.Column():
                gr.Markdown("### Speculative `generate(assistant_model=draft)`")
                spec_text = gr.HighlightedText(
                    label="Speculative", combine_adjacent=True, show_legend=True, elem_id="spec-text",
                    color_map={LABELS["draft"]: "green", LABELS["target"]: "blue"},
                )  # fmt: skip
                spec_figures = gr.Markdown(elem_id="spec-figures")
        result = gr.Markdown(elem_id="summary")
        plot = gr.Plot(label="Accepted length per step")
        if examples:
            gr.Examples(examples, inputs=[image, question], label="Testbed examples", elem_id="examples")
        button.click(
            demo_state.run,
            inputs=[image, question, temperature, tree, max_new_tokens],
            outputs=[plain_text, plain_figures, spec_text, spec_figures, result, plot],
            api_name="generate",
        )
    # One run at a time, so that visitors never share the machine during a timed run; a short waiting line.
    demo.queue(default_concurrency_limit=1, max_size=16)
    return demo


def load(model: str | None, draft_id: str | None):
    """The testbed with a shipped draft (by name, default `"specvlm-draft"`) or a draft directory, or a LLaVA
    checkpoint with its draft, on the GPU when there is one."""
    if not model:
        from specvlm_hf.testbed import heldout_prompts, load_testbed, load_testbed_draft
        from specvlm_hf.testbed.store import SHIPPED_DRAFTS

        target, processor = load_testbed()
        if draft_id and draft_id not in SHIPPED_DRAFTS:
            draft = SpecVLMDraftModel.from_pretrained(draft_id, target=target)
        else:
            draft = load_testbed_draft(draft_id or "specvlm-draft", target)
        examples = [[p.image, p.question] for p in heldout_prompts("long", n=3) + heldout_prompts("short", n=2)]
        return target, processor, draft, examples
    if not draft_id:
        raise SystemExit("--model needs --draft (a SpecVLM draft trained for that model)")
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.float16 if device == "cuda" else torch.float32
    target = LlavaForConditionalGeneration.from_pretrained(model, dtype=dtype, attn_implementation="sdpa").to(device)
    processor = AutoProcessor.from_pretrained(model)
    return target.eval(), processor, SpecVLMDraftModel.from_pretrained(draft_id, target=target), None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    env = os.environ
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=env.get("SPECVLM_DEMO_MODEL"), help="LLaVA model id or path.")
    parser.add_argument("--draft", default=env.get("SPECVLM_DEMO_DRAFT"), help="Draft id or path.")
    parser.add_argument("--port", type=int, default=int(env.get("GRADIO_SERVER_PORT") or env.get("PORT") or 7860),
                        help="Port (default: $GRADIO_SERVER_PORT, else $PORT, else 7860).")  # fmt: skip
    parser.add_argument("--host", default=env.get("GRADIO_SERVER_NAME", "127.0.0.1"),
                        help="Host (default: $GRADIO_SERVER_NAME, else 127.0.0.1).")  # fmt: skip
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        target, processor, draft, examples = load(args.model, args.draft)
    except (OSError, ValueError) as error:  # a model or draft that cannot be loaded: say which, and why
        raise SystemExit(
            f"Could not load model {args.model or 'testbed'!r} / draft {args.draft!r}: {error}"
        ) from error
    build_demo(target, processor, draft, examples).launch(server_name=args.host, server_port=args.port)


if __name__ == "__main__":
    main()
