"""``mole-chat``: ask a trained LLaVA-MoLE about an image, in one shot or as a conversation in the console.

Usage::

    mole-chat --checkpoint runs/demo/checkpoints/last.ckpt --config configs/demo.yaml --image cat.jpg \\
        --question "What colour is the shape?"
    mole-chat --adapter adapters/demo --config configs/demo.yaml --image cat.jpg        # conversation
    mole-chat --llava-hf llava-1.5-7b-hf --image cat.jpg --show-routing 3 --question "..."

With ``--question`` the answer is printed and the program ends. Without it, each line read from the console is a
user turn; the conversation carries over turns. Commands: ``/image PATH`` switches to another image (and starts a
new conversation about it: one image per conversation, as in training), ``/reset`` starts over, ``/quit`` or end of
input ends. Tokens are printed as they are generated. ``--show-routing [LAYER]`` colours every token by the top-1
expert of the MoLE router at that layer in the step that generated it and prints each expert's share of the answer.

Exit status: 0 on success, 2 for bad input (missing or unreadable image, config or checkpoint, a checkpoint that does
not match the config), with one line on stderr naming the problem.
"""

from __future__ import annotations

import argparse
import sys
from contextlib import nullcontext
from typing import Any, TextIO

import torch
from rich.console import Console
from rich.text import Text

from mole_lightning.inference import (
    Assistant,
    InferenceError,
    RoutingTrace,
    expert_shares,
    load_from_config,
    load_from_llava_hf,
    read_image,
    trace_routing,
)

EXPERT_STYLES = ("bold red", "bold green", "bold blue", "bold magenta", "bold cyan", "bold yellow", "red", "green")
"""Colour of each expert (cycled when there are more experts)."""

COMMANDS_HELP = "commands: /image PATH (new image, new conversation), /reset, /quit; end of input also ends"


def build_parser() -> argparse.ArgumentParser:
    """The command-line arguments of ``mole-chat``."""
    parser = argparse.ArgumentParser(
        prog="mole-chat",
        description="Ask a trained LLaVA-MoLE about an image (one answer with --question, else a conversation).",
    )
    source = parser.add_argument_group("model (--config with --checkpoint or --adapter, or --llava-hf)")
    source.add_argument("--config", help="mole-train YAML recipe: model, data.template, trainer.precision")
    source.add_argument("--checkpoint", help="training checkpoint (.ckpt) of that recipe")
    source.add_argument("--adapter", help="adapter export folder (tools/export_adapter.py)")
    source.add_argument("--llava-hf", dest="llava_hf", help="llava-hf LlavaForConditionalGeneration folder")
    parser.add_argument("--image", help="image file the conversation is about (optional)")
    parser.add_argument("--question", help="ask this, print the answer and end")
    parser.add_argument(
        "--show-routing",
        nargs="?",
        type=int,
        const=-1,
        default=None,
        metavar="LAYER",
        help="colour tokens by their top-1 expert at MoLE layer LAYER (index of the router, default: the last)",
    )
    parser.add_argument("--max-new-tokens", type=int, default=128, help="default: 128")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling (with --temperature > 0)")
    parser.add_argument("--template", help="override the recipe's data.template (llava-hf default: processor)")
    parser.add_argument("--device", help="e.g. cpu, cuda, cuda:1 (default: the first GPU, else the CPU)")
    return parser


def check_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Reject contradictory model sources (argparse's error: usage and one line, exit status 2)."""
    if args.llava_hf is not None:
        if args.checkpoint is not None or args.config is not None:
            parser.error("--llava-hf goes without --config/--checkpoint (add --adapter for an export)")
    elif args.config is None or (args.checkpoint is None) == (args.adapter is None):
        parser.error("give --config with one of --checkpoint or --adapter, or --llava-hf DIR")
    if args.max_new_tokens < 1:
        parser.error("--max-new-tokens must be at least 1")
    if args.temperature < 0 or not 0 < args.top_p <= 1:
        parser.error("--temperature must be >= 0 and --top-p in (0, 1]")


def load_assistant(args: argparse.Namespace) -> Assistant:
    """The model the arguments name."""
    if args.llava_hf is not None:
        options = {"template": args.template} if args.template else {}
        return load_from_llava_hf(args.llava_hf, adapter=args.adapter, device=args.device, **options)
    return load_from_config(
        args.config, checkpoint=args.checkpoint, adapter=args.adapter, device=args.device, template=args.template
    )


def sampling_options(args: argparse.Namespace) -> dict[str, Any]:
    """``generate`` options: greedy at temperature 0, else sampling with ``temperature`` and ``top_p``."""
    if args.temperature == 0:
        return {"do_sample": False}
    return {"do_sample": True, "temperature": args.temperature, "top_p": args.top_p}


def router_index(layer: int, trace: RoutingTrace) -> int:
    """``layer`` as an index into the trace's routers (negative counts from the end).

    Raises:
        InferenceError: no such router.
    """
    count = len(trace.names)
    if not -count <= layer < count:
        raise InferenceError(f"--show-routing {layer}: the model has MoLE routers 0..{count - 1}")
    return layer % count


class AnswerPrinter:
    """A transformers streamer (``put``/``end``) that prints the new tokens of one answer as they come.

    The first ``put`` is the prompt and is skipped. Text is decoded from all new tokens so far (special tokens
    skipped) and only the new characters are printed, leading whitespace dropped as in the stripped answer; an
    incomplete multi-byte character waits for the next token. With a routing trace and a layer, each token's text
    is coloured by the expert that its generating step chose there.
    """

    def __init__(self, tokenizer: Any, console: Any, trace: RoutingTrace | None = None, layer: int = -1) -> None:
        self.tokenizer = tokenizer
        self.console = console
        self.trace = trace
        self.layer = layer
        self.ids: list[int] = []
        self.printed = ""
        self.prompt_seen = False

    def put(self, value: Any) -> None:
        """Receive the prompt (first call) or the next token(s) of a single sequence."""
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        for token in value.reshape(-1).tolist():
            self.ids.append(int(token))
            self.flush(final=False)

    def flush(self, final: bool) -> None:
        """Print what the decoded answer gained since the last print (held back: a trailing partial character)."""
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True).lstrip()
        if not text.startswith(self.printed) or (text.endswith("\ufffd") and not final):
            return
        self.write(text[len(self.printed) :], len(self.ids) - 1)
        self.printed = text

    def write(self, text: str, step: int) -> None:
        """Print ``text`` (from generation step ``step``), coloured by its expert on a terminal."""
        if not text:
            return
        if self.trace is None or not self.console.is_terminal:
            self.console.file.write(text)  # verbatim: rich would drop control characters
        else:
            expert = int(self.trace.steps[self.layer][step][0])
            self.console.print(Text(text, style=EXPERT_STYLES[expert % len(EXPERT_STYLES)]), end="")
        self.console.file.flush()

    def end(self) -> None:
        """Generation finished: print the rest, even an incomplete character."""
        self.flush(final=True)


def answer_token_mask(ids: list[int], tokenizer: Any) -> list[bool]:
    """True for the generated tokens that belong to the answer text (not special tokens such as ``</s>``)."""
    special = set(tokenizer.all_special_ids)
    return [token not in special for token in ids]


def routing_line(trace: RoutingTrace, layer: int, ids: list[int], tokenizer: Any) -> Any:
    """``routing <router>: N answer tokens, expert0 0.5000 expert1 ...`` (a rich ``Text``, labels coloured)."""
    experts = trace.experts(layer)[0][: len(ids)]
    keep = torch.tensor(answer_token_mask(ids, tokenizer), dtype=torch.bool)
    shares = expert_shares(experts[keep], trace.num_experts)
    line = Text(f"routing {trace.names[layer]}: {int(keep.sum())} answer tokens,")
    for expert, share in enumerate(shares):
        line.append(" ")
        line.append(f"expert{expert}", style=EXPERT_STYLES[expert % len(EXPERT_STYLES)])
        line.append(f" {share:.4f}")
    return line


def answer(
    assistant: Assistant,
    conversation: list[dict[str, str]],
    image: bytes | None,
    args: argparse.Namespace,
    console: Any,
) -> str:
    """Generate and stream the reply to the conversation's last user turn; returns the stripped answer."""
    batch = assistant.encode([(conversation, image)])
    show = args.show_routing is not None
    with trace_routing(assistant.model) if show else nullcontext() as trace:
        layer = router_index(args.show_routing, trace) if show else -1
        printer = AnswerPrinter(assistant.tokenizer, console, trace, layer)
        [text] = assistant.generate(batch, args.max_new_tokens, streamer=printer, **sampling_options(args))
    console.print()
    if show:
        console.print(routing_line(trace, layer, printer.ids, assistant.tokenizer))
    return text


def converse(assistant: Assistant, image: bytes | None, args: argparse.Namespace, console: Any, lines: TextIO) -> None:
    """The interactive loop: user turns from ``lines`` until ``/quit`` or end of input."""
    interactive = lines.isatty()
    if interactive:
        print(COMMANDS_HELP, file=sys.stderr)
    conversation: list[dict[str, str]] = []
    while True:
        if interactive:
            print("user> ", end="", file=sys.stderr, flush=True)
        line = lines.readline()
        if not line:
            return
        text = line.strip()
        if not text:
            continue
        if text == "/quit":
            return
        if text == "/reset":
            conversation = []
            print("(new conversation)", file=sys.stderr)
            continue
        if text.startswith("/image"):
            path = text[len("/image") :].strip()
            try:
                image = read_image(path) if path else None
            except InferenceError as error:
                print(f"mole-chat: {error}", file=sys.stderr)
                continue
            conversation = []
            print(f"(new conversation about {path})" if path else "(new conversation without image)", file=sys.stderr)
            continue
        if text.startswith("/"):
            print(f"mole-chat: unknown command {text.split()[0]}; {COMMANDS_HELP}", file=sys.stderr)
            continue
        turn = conversation + [{"from": "human", "value": text}]
        try:
            reply = answer(assistant, turn, image, args, console)
        except InferenceError as error:
            print(f"mole-chat: {error}", file=sys.stderr)
            continue
        conversation = turn + [{"from": "gpt", "value": reply}]


def main(argv: list[str] | None = None) -> int:
    """Console-script entry point; returns the exit status (2 for bad input, with one line on stderr)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    check_arguments(parser, args)
    console = Console(file=sys.stdout, highlight=False, soft_wrap=True)
    try:
        image = read_image(args.image) if args.image is not None else None
        assistant = load_assistant(args)
        if args.question is not None:
            answer(assistant, [{"from": "human", "value": args.question}], image, args, console)
        else:
            converse(assistant, image, args, console, sys.stdin)
    except InferenceError as error:
        print(f"mole-chat: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
