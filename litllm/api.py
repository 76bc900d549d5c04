"""`LLM`: the Python face of litllm inference (model + tokenizer + prompt style + generation).

    from litllm import LLM

    llm = LLM.load("checkpoints/meta-llama/Llama-3.2-1B-Instruct")   # or a repo id: downloads first
    llm.generate("What do llamas eat?", max_new_tokens=50)            # -> str
    for chunk in llm.generate("Tell me a story", stream=True):        # -> text chunks as they come
        print(chunk, end="")
    llm.generate(["First prompt", "Second prompt"])                   # one continuous batch -> list[str]
    llm.chat([{"role": "user", "content": "Hi!"}])                    # -> the assistant's reply
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Iterator, Optional, Union

import torch

from litllm.engine import SEED_LIMIT, Request, Sampling, check_sampling_args, default_stops
from litllm.errors import LitLLMError
from litllm.generate import check_draft_flags, decode_engine, load_draft, speculative_engine
from litllm.inference import LoadArgs, load_decoder, tokens_to_generate

logger = logging.getLogger(__name__)


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
        self._said: set[str] = set()  # notes already printed (a reduced default is said once)
        # speculative decoding (`LLM.load(draft_model=...)`): the draft model, tokens it proposes per step,
        # and the share of its proposals the last generate/chat call accepted
        self.draft = None
        self.num_speculative_tokens = 4
        self.acceptance_rate: Optional[float] = None
        self.compile: Optional[bool] = None  # compile the decode step (None: where it pays, litllm.compile_decode)

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
        draft_model: Optional[Union[str, Path]] = None,
        num_speculative_tokens: int = 4,
        devices: int = 1,
        num_nodes: int = 1,
        strategy: str = "tensor",
        compile: Optional[bool] = None,
    ) -> "LLM":
        """Load a converted model folder, or a Hub repo id (`org/name`), downloaded and converted first
        into `<checkpoint_root>/<org>/<name>` unless it is already there.

        device: `cpu`, `cuda`, ... (default: cuda when available).
        precision: `32-true`, `bf16-true` or `16-true` (default: bf16 on a GPU that supports it and, unquantized, on a CPU with bf16 units, else fp32; see `LoadArgs`).
        quantize: `bnb.nf4`, `bnb.nf4-dq`, `bnb.fp4` or `bnb.int8`.
        prompt_style: a prompt style name (default: the checkpoint's own).
        draft_model: speculative decoding: a small converted model folder with the same tokenizer that
            proposes `num_speculative_tokens` tokens per step for the model to check (same output; prompts
            of one call then decode one after the other). `llm.acceptance_rate`: its last call's share of
            accepted proposals.
        devices, num_nodes: tensor parallelism: shard the model over `devices` devices (processes) per node;
            this process is rank 0 and starts the others itself (see `litllm.parallel`). strategy="sequential"
            instead puts consecutive blocks on consecutive GPUs of this process.
        compile: compile the decode step with `torch.compile` (kernels cached in ~/.cache/litllm/torch_compile);
            default: for calls that decode enough tokens for it to pay, alone or with the eagerly decoded
            tokens of earlier short calls and runs of this model and shape, or that a saved compiled step fits
            (`litllm.compile_decode`); False: never.
        """
        load = LoadArgs(precision, quantize, device, devices, num_nodes, strategy)
        if draft_model is not None:  # before the model loads
            draft_model = check_draft_flags(_resolve(draft_model, Path(checkpoint_root), access_token),
                                            num_speculative_tokens, load.tensor_parallel)
        loaded = load_decoder(_resolve(model, Path(checkpoint_root), access_token), prompt_style, load)
        net, tokenizer = loaded.model, loaded.tokenizer
        llm = cls(net, tokenizer, loaded.prompt_style, loaded.checkpoint_dir, threads=loaded.threads)
        llm.compile = compile
        if draft_model is not None:
            llm.draft = load_draft(net, tokenizer, draft_model, precision)
            llm.num_speculative_tokens = num_speculative_tokens
        return llm

    # ------------------------------------------------------------------ generation
    def generate(
        self,
        prompt: Union[str, list[str]],
        max_new_tokens: Optional[int] = None,
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
        texts, generated as one continuous batch (each equals generating it alone; prompt i samples
        with seed + i). max_new_tokens: default 50, reduced to what the context window leaves.
        temperature 0 (the default) is greedy; `seed` makes sampling reproducible.
        """
        check_sampling_args(temperature, top_k, top_p, max_new_tokens, seed)
        if isinstance(prompt, (list, tuple)):
            if stream:
                raise LitLLMError("stream=True takes a single prompt, not a list")
            if not prompt:
                return []
            ids = [self._encode(p, sys_prompt, apply_prompt_style) for p in prompt]
        else:
            ids = [self._encode(prompt, sys_prompt, apply_prompt_style)]
        longest = max(len(p) for p in ids)
        max_new_tokens = self._fit(longest, max_new_tokens, 50)
        stops = default_stops(self.tokenizer, self.prompt_style)
        seeds = [None if seed is None else (seed + i) % SEED_LIMIT for i in range(len(ids))]
        requests = [Request(p, max_new_tokens, Sampling(temperature, top_k, top_p, s), **stops)
                    for p, s in zip(ids, seeds)]
        chunks = self._run(requests, longest + max_new_tokens)
        if stream:
            return (text for _, text in chunks)
        texts = [""] * len(requests)
        for i, text in chunks:
            texts[i] += text
        return texts if isinstance(prompt, (list, tuple)) else texts[0]

    def chat(
        self,
        messages: list[dict],
        max_new_tokens: Optional[int] = None,
        temperature: float = 0.0,
        top_k: Optional[int] = None,
        top_p: float = 1.0,
        stream: bool = False,
        seed: Optional[int] = None,
    ) -> Union[str, Iterator[str]]:
        """The assistant's reply to a conversation (`[{"role": ..., "content": ...}, ...]`).

        max_new_tokens: default 256, reduced to what the context window leaves after the conversation.
        """
        check_sampling_args(temperature, top_k, top_p, max_new_tokens, seed)
        text = self.prompt_style.render_messages(messages, add_generation_prompt=True)
        ids = self.prompt_style.encode(self.tokenizer, text).tolist()
        max_new_tokens = self._fit(len(ids), max_new_tokens, 256)
        request = Request(ids, max_new_tokens, Sampling(temperature, top_k, top_p, seed),
                          **default_stops(self.tokenizer, self.prompt_style))
        chunks = (text for _, text in self._run([request], len(ids) + max_new_tokens))
        return chunks if stream else "".join(chunks)

    # ------------------------------------------------------------------ helpers
    def _encode(self, prompt: str, sys_prompt: Optional[str], apply_prompt_style: bool) -> list[int]:
        if not isinstance(prompt, str):
            raise LitLLMError(f"prompt: expected a string or a list of strings, got {type(prompt).__name__}")
        if not apply_prompt_style:
            return self.tokenizer.encode(prompt).tolist()
        return self.prompt_style.encode(self.tokenizer, self.prompt_style.apply(prompt, sys_prompt=sys_prompt)).tolist()

    def _fit(self, prompt_len: int, requested: Optional[int], default: int) -> int:
        def say_once(line: str) -> None:
            if line not in self._said:
                self._said.add(line)
                print(line, file=sys.stderr)

        return tokens_to_generate(prompt_len, self.model.max_seq_length, requested, default, "max_new_tokens", say_once)

    def _run(self, requests: list[Request], length: int) -> Iterator[tuple[int, str]]:
        """(index of the request, new text) as the engine produces them; the engine (and the KV cache)
        lives while the iterator does, also when a streaming consumer stops early."""
        engine = self._engine(len(requests), length, sum(r.max_new_tokens for r in requests))
        try:
            index = {engine.add(r): i for i, r in enumerate(requests)}
            while engine.has_unfinished:
                for out in engine.step():
                    if out.text:
                        yield index[out.request_id], out.text
        finally:
            engine.close()
            if self.draft is not None:
                self.acceptance_rate = engine.acceptance_rate
                logger.info("draft acceptance: %s of %d proposed tokens", engine.accepted, engine.proposed)

    def _engine(self, rows: int, length: int, tokens: int):
        """An Engine of `rows` rows (its step compiled where `tokens` new tokens pay for it, `decode_engine`); with a
        draft model a one-row SpeculativeEngine (requests one after another)."""
        if self.draft is None:  # (a compiled step's own thread pick replaces the loader's, `compiled_threads`)
            return decode_engine(self.model, self.tokenizer, rows, length, self.threads, self.compile, tokens)
        return speculative_engine(self.model, self.draft, self.tokenizer, length, self.threads,
                                  self.num_speculative_tokens, self.compile, tokens)

    def __repr__(self) -> str:
        return f"LLM({self.checkpoint_dir}, device={self.device}, prompt_style={self.prompt_style.name})"


def _resolve(model: Union[str, Path], checkpoint_root: Path, access_token: Optional[str]) -> Path:
    """A model folder for `model`: an existing folder, or `<root>/<repo id>` (downloaded if needed)."""
    from litllm.download import REPO_ID
    from litllm.model_folder import check_model_folder

    path = Path(model)
    if path.is_dir():
        return check_model_folder(path)
    text = str(model)
    if not REPO_ID.match(text):
        raise LitLLMError(f"{text}: not a model folder, nor a Hub repo id (`org/name`)")
    local = checkpoint_root / text
    if not (local / "lit_model.safetensors").is_file():
        from litllm.download import download

        download(text, checkpoint_dir=checkpoint_root, access_token=access_token)
    return check_model_folder(local)
