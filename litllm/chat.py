"""`litllm chat`: an interactive multi-turn chat with a model in the terminal.

Input: type a message and press Enter. To write several lines, end a line with `\\` to continue on
the next one, or open a block with a line holding only `\"\"\"` and close it the same way.
Commands: `/reset` forgets the conversation (the system prompt stays), `/exit` (or Ctrl-D) quits.
Ctrl-C while the model is answering stops the answer and returns to the prompt.

The whole conversation is re-rendered with the prompt style each turn. When it no longer fits in
the context window (leaving room for `max_new_tokens`), the oldest turns are dropped, never the
system prompt or the newest message.

With `--draft_model` (speculative decoding) each answer is followed, on stderr, by its draft acceptance rate
(the share of the draft's proposed tokens the model kept, as `generate` prints it), and the conversation's at the
end.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional, TextIO

import torch

from litllm.engine import Request, check_sampling_args
from litllm.errors import LitLLMError
from litllm.flags import with_flags
from litllm.generate import DecodeArgs, acceptance_line
from litllm.inference import LoadArgs, load_decoder, tokens_to_reserve

EXIT, RESET = "/exit", "/reset"
BLOCK = '"""'


def _readline(stdin: TextIO, stdout: TextIO, prompt: str) -> Optional[str]:
    """One line without its newline; None at end of input. A terminal gets `input()` (line editing)."""
    if stdin is sys.stdin and stdin.isatty():
        try:
            import readline  # noqa: F401  (arrow keys and history for input())
        except ImportError:
            pass
        try:
            return input(prompt)
        except EOFError:
            return None
    stdout.write(prompt)
    stdout.flush()
    line = stdin.readline()
    return line.rstrip("\n") if line else None


def read_message(stdin: TextIO, stdout: TextIO, prompt: str = ">> You: ") -> Optional[str]:
    """Read one message (see the module docstring for multiline input); None at end of input."""
    line = _readline(stdin, stdout, prompt)
    if line is None:
        return None
    if line.strip() == BLOCK:
        lines = []
        while (more := _readline(stdin, stdout, "")) is not None and more.strip() != BLOCK:
            lines.append(more)
        return "\n".join(lines)
    lines = []
    while line.endswith("\\"):
        lines.append(line[:-1])
        line = _readline(stdin, stdout, "")
        if line is None:
            line = ""
            break
    lines.append(line)
    return "\n".join(lines)


def fit_history(style, tokenizer, messages: list[dict], budget: int) -> tuple[list[dict], torch.Tensor]:
    """Drop the oldest turns (keeping a leading system message) until the rendered prompt has at most
    `budget` tokens; returns the kept messages and the prompt ids. Raises if the newest message alone
    doesn't fit."""
    system = messages[:1] if messages and messages[0]["role"] == "system" else []
    turns = messages[len(system):]
    while True:
        kept = system + turns
        ids = style.encode(tokenizer, style.render_messages(kept, add_generation_prompt=True))
        if ids.numel() <= budget:
            return kept, ids
        if len(turns) <= 1:
            raise LitLLMError(
                f"the message needs {ids.numel()} tokens with the prompt format, but only {budget} fit in the "
                "context window (after reserving --max_new_tokens): write a shorter message or lower --max_new_tokens"
            )
        # drop the oldest exchange: a user message and the reply that follows it
        turns = turns[2:] if len(turns) > 2 and turns[1]["role"] == "assistant" else turns[1:]


def _report_acceptance(engine, decoding: DecodeArgs, stdout: TextIO, accepted: int, proposed: int,
                       what: str = "") -> None:
    """With a draft model: the draft acceptance of the engine's proposals since it had counted `accepted` of
    `proposed`, one line on stderr (after what stdout holds so far); nothing where none were proposed."""
    accepted, proposed = getattr(engine, "accepted", 0) - accepted, getattr(engine, "proposed", 0) - proposed
    if proposed:
        stdout.flush()
        print(acceptance_line(accepted, proposed, decoding.num_speculative_tokens, what), file=sys.stderr, flush=True)


@with_flags("decode", DecodeArgs)
@with_flags("load", LoadArgs)
def chat(
    checkpoint_dir: Path,
    *,
    max_new_tokens: Optional[int] = None,
    decode: dict,
    load: dict,
) -> None:
    """Chat with a model in the terminal (multi-turn, streamed answers).

    Type a message and press Enter. End a line with `\\` to continue on the next line, or enclose
    several lines between two lines holding only `\"\"\"`. `/reset` starts a new conversation,
    `/exit` or Ctrl-D quits, Ctrl-C stops an answer. With `--draft_model`, each answer's draft acceptance rate
    and, at the end, the conversation's are printed to stderr.

    Args:
        checkpoint_dir: A converted model folder.
        max_new_tokens: Most tokens per answer; this much room is kept free in the context window.
            Default 512, reduced to half the context window (the other half holds the conversation).
    """
    decoding = DecodeArgs(**decode)
    check_sampling_args(decoding.temperature, decoding.top_k, decoding.top_p, max_new_tokens, decoding.seed)
    decoding.check_draft(LoadArgs(**load))
    loaded = load_decoder(checkpoint_dir, decoding.prompt_style, LoadArgs(**load))
    checkpoint_dir, tokenizer, style, window = loaded.checkpoint_dir, loaded.tokenizer, loaded.prompt_style, loaded.window
    max_new_tokens = tokens_to_reserve(window, max_new_tokens, 512)
    stops = loaded.stops()
    budget = window - max_new_tokens
    system = [{"role": "system", "content": decoding.sys_prompt}] if decoding.sys_prompt else []
    history: list[dict] = list(system)
    print(f"Chatting with {checkpoint_dir} ({style.name} prompt style). "
          f"End a line with \\ or use {BLOCK} blocks for several lines; {RESET} clears, {EXIT} quits.", file=sys.stderr)

    stdin, stdout = sys.stdin, sys.stdout
    turn = 0
    # one engine (and KV cache) for the whole conversation
    with decoding.engine(loaded.model, tokenizer, window, loaded.threads, LoadArgs(**load)) as engine:
        while True:
            message = read_message(stdin, stdout)
            if message is None or message.strip() == EXIT:
                stdout.write("\n" if message is None else "")
                _report_acceptance(engine, decoding, stdout, 0, 0, " over the conversation")
                return
            if message.strip() == RESET:
                history = list(system)
                stdout.write("(conversation cleared)\n")
                continue
            if not message.strip():
                continue
            try:
                history, prompt_ids = fit_history(style, tokenizer, history + [{"role": "user", "content": message}], budget)
            except LitLLMError as e:
                stdout.write(f"error: {e}\n")
                continue
            stdout.write(">> Model: ")
            stdout.flush()
            reply = []
            before = getattr(engine, "accepted", 0), getattr(engine, "proposed", 0)  # speculative decoding's counts
            # each answer gets its own seed, so a conversation replays the same way
            request_id = engine.add(Request(prompt_ids.tolist(), max_new_tokens, decoding.sampling(turn), **stops))
            turn += 1
            try:
                while engine.has_unfinished:
                    for out in engine.step():
                        reply.append(out.text)
                        stdout.write(out.text)
                        stdout.flush()
            except KeyboardInterrupt:
                engine.abort(request_id)
                engine.step()  # frees the row
                stdout.write(" [stopped]")
            stdout.write("\n")
            _report_acceptance(engine, decoding, stdout, *before)
            stdout.write("\n")
            stdout.flush()
            history.append({"role": "assistant", "content": "".join(reply)})
