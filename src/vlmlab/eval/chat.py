"""`vlmlab chat CHECKPOINT IMAGE`: talk to a model about an image in the terminal.

The conversation is rendered with the model's own chat template; the image goes with the first
turn and the history is kept, as in training. `--prompt TEXT` asks once and prints only the answer.
What the user types is text: the template's control tokens (`</s>`, `<|im_end|>` ...) typed in it
are tokenised as text (`TextEncoder.encode_prompt`), and `<image>`, whose place the chat decides,
is refused.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from PIL import Image

from vlmlab.errors import ConfigError
from vlmlab.eval.generate import GenerationConfig, Generator, Request
from vlmlab.eval.loading import add_device_arguments, load_model
from vlmlab.text import IMAGE_PLACEHOLDER
from vlmlab.text.templates import Turn

log = logging.getLogger(__name__)

QUIT = ("/quit", "/exit")
RESET = "/reset"


class Conversation:
    """History of one chat about one image; `ask` returns the reply and remembers both turns."""

    def __init__(self, generator: Generator, image: Image.Image | None, config: GenerationConfig):
        self.generator = generator
        self.image = image
        self.config = config
        self.turns: list[Turn] = []

    def ask(self, text: str) -> str:
        """The model's answer to `text`; ValueError for text holding `<image>`."""
        if IMAGE_PLACEHOLDER in text:
            raise ValueError(
                f"{IMAGE_PLACEHOLDER} in the question: the chat puts the image in front of the "
                "first question itself; remove it from the text"
            )
        if not self.turns and self.image is not None:
            text = f"{IMAGE_PLACEHOLDER}\n{text}"
        turns = [*self.turns, Turn("human", text)]
        (answer,) = self.generator([Request(turns, self.image)], self.config)
        self.turns = [*turns, Turn("gpt", answer)]
        return answer

    def reset(self) -> None:
        self.turns = []


def _interactive(conversation: Conversation) -> None:
    print(f"chat ({conversation.generator.template.name} template); {RESET} clears, Ctrl-D quits")
    while True:
        try:
            text = input("you> ").strip()
        except EOFError:
            print()
            return
        if text in QUIT:
            return
        if text == RESET:
            conversation.reset()
            continue
        if text:
            try:
                print(f"model> {conversation.ask(text)}", flush=True)
            except ValueError as err:
                print(f"vlmlab chat: {err}", file=sys.stderr)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="vlmlab chat", description=__doc__)
    parser.add_argument(
        "checkpoint", help="checkpoint/merged/HF Llava folder, or MLflow run id / runs:/ URI"
    )
    parser.add_argument("image", help="image file ('-' for a text-only chat)")
    parser.add_argument("--prompt", help="ask once, print only the answer, exit")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--seed", type=int, help="makes sampling reproducible")
    parser.add_argument(
        "--stop", action="append", default=[], help="extra stop string (repeatable)"
    )
    parser.add_argument(
        "--template", help="chat template (default: the one the model trained with)"
    )
    parser.add_argument("--tracking-uri", help="MLflow store for run ids")
    add_device_arguments(parser)
    args = parser.parse_args(argv)
    from vlmlab.logs import setup_logging

    setup_logging(logging.INFO if args.prompt is None else logging.WARNING)
    try:
        image = None
        if args.image != "-":
            if not Path(args.image).is_file():
                raise ConfigError(
                    "IMAGE", f"{args.image} is not a file.", "give an image path or '-'."
                )
            with Image.open(args.image) as opened:
                # decoded as is: the model's processor makes RGB its way (AnyRes composites
                # transparency on white and applies EXIF orientation, pad converts)
                image = opened.copy()
        config = GenerationConfig(
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_p=args.top_p,
            top_k=args.top_k,
            seed=args.seed,
            stop=tuple(args.stop),
        )
        config.check()
        loaded = load_model(
            args.checkpoint, args.tracking_uri, args.template, device=args.device, dtype=args.dtype
        )
    except (ConfigError, OSError) as err:
        print(f"vlmlab chat: {err}", file=sys.stderr)
        return 2
    if loaded.template.name == "plain":
        log.warning(
            "plain template (a stage-1 checkpoint): the model captions the image, text is ignored"
        )
    conversation = Conversation(loaded.generator(), image, config)
    if args.prompt is not None:
        try:
            print(conversation.ask(args.prompt))
        except ValueError as err:
            print(f"vlmlab chat: {err}", file=sys.stderr)
            return 2
        return 0
    _interactive(conversation)
    return 0
