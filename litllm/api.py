"""`LLM`: the Python face of litllm inference (model + tokenizer + prompt style + generation).

    from litllm import LLM

    llm = LLM.load("checkpoints/meta-llama/Llama-3.2-1B-Instruct")   # or a repo id: downloads first
    llm.generate("What do llamas eat?", max_new_tokens=50)            # -> str
    for chunk in llm.generate("Tell me a story", stream=True):        # -> text chunks as they come
        print(chunk, end="")
    llm.generate(["First prompt", "Second prompt"])                   # batched (left-padded) -> list[str]
    llm.chat([{"role": "user", "content": "Hi!"}])                    # -> the assistant's reply
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator, Optional, Union

import torch

from litllm.errors import LitLLMError
from litllm.generate import (
    check_sampling_args, context_check, default_device, generate_batch, generate_tokens, load_for_inference,
    optimize_for_decoding, pick_decode_threads, stream_text, threads_for,
)


class LLM:
    """A loaded model ready to generate. Build it with `LLM.load`."""

    def __init__(
        self, model, tokenizer, prompt_style, checkpoint_dir: Optional[Path] = None, threads: Optional[int] = None
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.prompt_style = prompt_style
        self.checkpoint_dir = checkpoint_dir
        # CPU threads used while generating (None: torch's setting); restored after each call
        self.threads = threads

    @property
    def device(self) -> torch.device:
        return self.model.wte.weight.device

    @classmethod
    def load(
        cls,
        model: Union[str, Path],
        device: Optional[str] = None,
        precision: Optional[str] = None,
        quantize: Optional[str] = None,
        prompt_style: Optional[str] = None,
        access_token: Optional[str] = None,
        checkpoint_root: Union[str, Path] = "checkpoints",
    ) -> "LLM":
        """Load a converted model folder, or a Hub repo id (`org/name`), downloaded and converted first
        into `<checkpoint_root>/<org>/<name>` unless it is already there.

        device: `cpu`, `cuda`, ... (default: cuda when available).
        precision: `32-true`, `bf16-true` or `16-true` (default: bf16 on a GPU that supports it, else fp32).
        quantize: `bnb.nf4`, `bnb.nf4-dq`, `bnb.fp4` or `bnb.int8`.
        prompt_style: a prompt style name (default: the checkpoint's own).
        """
        from litllm.prompts import PromptStyle
        from litllm.tokenizer import Tokenizer

        checkpoint_dir = _resolve(model, Path(checkpoint_root), access_token)
        tokenizer = Tokenizer(checkpoint_dir)
        style = PromptStyle.from_name(prompt_style) if prompt_style else PromptStyle.from_checkpoint(checkpoint_dir)
        net = load_for_inference(checkpoint_dir, device or default_device(), precision, quantize)
        optimize_for_decoding(net)
        return cls(net, tokenizer, style, checkpoint_dir, threads=pick_decode_threads(net))

    # ------------------------------------------------------------------ generation
    def generate(
        self,
        prompt: Union[str, list[str]],
        max_new_tokens: int = 50,
        temperature: float = 0.0,
        top_k: Optional[int] = None,
        top_p: float = 1.0,
        stream: bool = False,
        sys_prompt: Optional[str] = None,
        apply_prompt_style: bool = True,
        seed: Optional[int] = None,
    ) -> Union[str, list[str], Iterator[str]]:
        """Generate a continuation of `prompt` (formatted with the prompt style unless `apply_prompt_style=False`).

        Returns the text; with `stream=True` an iterator of text chunks; for a list of prompts, a list of
        texts, generated as one left-padded batch (greedy results equal generating them one by one).
        temperature 0 (the default) is greedy; `seed` makes sampling reproducible.
        """
        check_sampling_args(temperature, top_k, top_p, max_new_tokens)
        generator = torch.Generator(device=self.device).manual_seed(seed) if seed is not None else None
        if isinstance(prompt, (list, tuple)):
            if stream:
                raise LitLLMError("stream=True takes a single prompt, not a list")
            if not prompt:
                return []
            ids = [self._encode(p, sys_prompt, apply_prompt_style) for p in prompt]
            for p in ids:
                context_check(self.model, p.numel(), max_new_tokens)
            pad_id = next((i for i in (self.tokenizer.pad_id, self.tokenizer.eos_id) if i is not None), 0)
            with threads_for(self.threads):
                outputs = generate_batch(
                    self.model, ids, max_new_tokens, temperature, top_k, top_p,
                    stop_sequences=self._stops(), pad_id=pad_id, generator=generator,
                )
            return [self.tokenizer.decode(out) for out in outputs]
        ids = self._encode(prompt, sys_prompt, apply_prompt_style)
        return self._run(ids, max_new_tokens, temperature, top_k, top_p, stream, generator)

    def chat(
        self,
        messages: list[dict],
        max_new_tokens: int = 256,
        temperature: float = 0.0,
        top_k: Optional[int] = None,
        top_p: float = 1.0,
        stream: bool = False,
        seed: Optional[int] = None,
    ) -> Union[str, Iterator[str]]:
        """The assistant's reply to a conversation (`[{"role": ..., "content": ...}, ...]`)."""
        check_sampling_args(temperature, top_k, top_p, max_new_tokens)
        generator = torch.Generator(device=self.device).manual_seed(seed) if seed is not None else None
        text = self.prompt_style.render_messages(messages, add_generation_prompt=True)
        ids = self.prompt_style.encode(self.tokenizer, text)
        return self._run(ids, max_new_tokens, temperature, top_k, top_p, stream, generator)

    # ------------------------------------------------------------------ helpers
    def _encode(self, prompt: str, sys_prompt: Optional[str], apply_prompt_style: bool) -> torch.Tensor:
        if not isinstance(prompt, str):
            raise LitLLMError(f"prompt: expected a string or a list of strings, got {type(prompt).__name__}")
        if not apply_prompt_style:
            return self.tokenizer.encode(prompt)
        return self.prompt_style.encode(self.tokenizer, self.prompt_style.apply(prompt, sys_prompt=sys_prompt))

    def _stops(self) -> list[list[int]]:
        return self.prompt_style.stop_tokens(self.tokenizer)

    def _run(self, ids, max_new_tokens, temperature, top_k, top_p, stream, generator):
        context_check(self.model, ids.numel(), max_new_tokens)  # fail here, not at the first next()
        tokens = generate_tokens(
            self.model, ids, max_new_tokens, temperature, top_k, top_p, stop_sequences=self._stops(),
            generator=generator,
        )
        if stream:
            return _with_threads(self.threads, stream_text(self.tokenizer, tokens))
        with threads_for(self.threads):
            return self.tokenizer.decode(list(tokens))

    def __repr__(self) -> str:
        return f"LLM({self.checkpoint_dir}, device={self.device}, prompt_style={self.prompt_style.name})"


def _with_threads(n: Optional[int], chunks: Iterator[str]) -> Iterator[str]:
    """Iterate `chunks` with `n` torch threads, the caller's setting back between chunks."""
    while True:
        with threads_for(n):
            chunk = next(chunks, None)
        if chunk is None:
            return
        yield chunk


def _resolve(model: Union[str, Path], checkpoint_root: Path, access_token: Optional[str]) -> Path:
    """A model folder for `model`: an existing folder, or `<root>/<repo id>` (downloaded if needed)."""
    from litllm.download import REPO_ID
    from litllm.utils import check_model_dir

    path = Path(model)
    if path.is_dir():
        return check_model_dir(path)
    text = str(model)
    if not REPO_ID.match(text):
        raise LitLLMError(f"{text}: not a model folder, nor a Hub repo id (`org/name`)")
    local = checkpoint_root / text
    if not (local / "lit_model.safetensors").is_file():
        from litllm.download import download

        download(text, checkpoint_dir=checkpoint_root, access_token=access_token)
    return check_model_dir(local)
