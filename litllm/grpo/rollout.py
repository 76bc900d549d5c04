"""Rollouts: G sampled completions of each prompt on litllm's decode engine, with the policy's current weights.

The policy module itself decodes (continuous batching, the G completions of a prompt share its prefill): no copy of
the model and no reload per step; its LoRA layers decode on merged weights (`merged_lora`: W + scaling * B @ A in a
buffer freed after the rollout). Every completion samples from its own seeded generator, the seed
a pure function of (run seed, split, epoch, prompt index, completion), so a resumed run samples exactly what the
uninterrupted one did without any RNG state in its checkpoint.

The rollout engine (`RolloutEngine`) samples by inverse CDF: one uniform draw per row from its generator, then one
cumulative sum and search over the (rows, vocab) probabilities for all rows. `torch.multinomial` (the engine's
default) draws one exponential per vocabulary entry per row, which was ~15% of a rollout's CPU time (vocabulary 8000).
It runs the output head and the sampling on the rows still decoding only (a stopped completion's row leaves them).
Where it pays (`--compile_rollouts`), the decode step is the saved compiled step of `litllm.compile_decode`, handed the
policy's current tensors at each rollout (`rollout_engine`); the sampling stays eager.
"""

from __future__ import annotations

import hashlib
import sys
import time
import weakref
from contextlib import contextmanager
from dataclasses import dataclass, fields
from typing import Iterator, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from litllm.engine import Engine, Request, Sampling, sampling_probs
from litllm.errors import LitLLMError
from litllm.utils import kept_modules

SEED_BYTES = 7
MERGED_BUFFER = "merged_weight"
COMPILED_AHEAD = ("loaded", "compiled")  # `Engine.step_source` of a saved AOTInductor step (litllm.compile_decode)
_EAGER_ONLY: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()  # policies whose step did not export


def completion_seed(run_seed: int, split: str, epoch: int, index: int, completion: int) -> int:
    """The sampling seed of one completion (< 2**56)."""
    key = f"litllm-grpo:{run_seed}:{split}:{epoch}:{index}:{completion}".encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=SEED_BYTES).digest(), "little")


@dataclass
class Rollout:
    """One micro-batch's completions and everything the loss needs of them, as tensors (a checkpoint keeps it)."""

    input_ids: torch.Tensor
    """(N, L) prompt then completion, right-padded with 0; N = prompts x G, a prompt's G completions adjacent."""
    prompt_lens: torch.Tensor
    """(N,) prompt tokens of each row."""
    completion_mask: torch.Tensor
    """(N, C) 1 on each completion's tokens (its stop token included, as TRL's mask)."""
    truncated: torch.Tensor
    """(N,) bool: the completion reached max_new_tokens without a stop token."""
    rewards: torch.Tensor
    """(N, F) float32 per reward function (NaN: not scored)."""
    advantages: torch.Tensor
    """(N,) float32."""
    old_logps: Optional[torch.Tensor] = None
    """(N, C) the policy's log-probs at generation time (num_iterations > 1)."""
    ref_logps: Optional[torch.Tensor] = None
    """(N, C) the reference model's log-probs (beta > 0)."""

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {f.name: getattr(self, f.name).cpu() for f in fields(self) if getattr(self, f.name) is not None}

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor]) -> "Rollout":
        return cls(**state)

    def to(self, device) -> "Rollout":
        return Rollout(**{f.name: None if getattr(self, f.name) is None else getattr(self, f.name).to(device)
                          for f in fields(self)})


def inverse_cdf_sample(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """(rows,) long: each row's token drawn from `probs` (rows, vocab) by the uniform in [0, 1) `uniforms` (rows,)
    float64: the first token whose cumulative probability exceeds uniform x total (a token of probability 0 never is;
    -1 for a row whose probabilities are not finite)."""
    cdf = probs.double().cumsum(-1)  # (rows, vocab), float64: tokens as rare as ~1e-16 keep their share
    total = cdf[:, -1:]  # (rows, 1)
    threshold = torch.minimum(uniforms[:, None] * total, torch.nextafter(total, torch.zeros_like(total)))
    picked = torch.searchsorted(cdf, threshold, right=True)[:, 0]
    return picked.masked_fill(~torch.isfinite(total[:, 0]) | (total[:, 0] <= 0), -1)


class RolloutEngine(Engine):
    """The decode engine, sampling with `inverse_cdf_sample` (one uniform per row from the row's generator). Every row of
    a rollout has the same sampling settings, temperature > 0, and no grammar. The output head and the sampling run on
    the rows still decoding only: a rollout's rows all start at once and a finished row's slot stays free. Compiled
    (a saved AOTInductor step), the head runs on every row and the running rows' logits are kept."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.compile_seconds: Optional[float] = None

    def _decode_logits(self, tokens: torch.Tensor, pos: torch.Tensor, kv_len: Optional[int]) -> torch.Tensor:
        """(R, vocab) logits of the R rows still decoding, in slot order (the `running` rows of `step`)."""
        from litllm.preference import head_only_at

        live = [row is not None and row.decoding for row in self._rows]
        if all(live):
            return super()._decode_logits(tokens, pos, kv_len)
        with head_only_at(self.model, torch.tensor(live, device=self.device)[:, None]):  # (B, 1)
            return self.model.decode(tokens, input_pos=pos, kv_len=kv_len)[0, :, : self.vocab_size]  # (R, vocab)

    def _sample(self, logits: torch.Tensor, row) -> int:
        return self._draw(logits, [(0, row)])[1][0]

    def _pick(self, logits: torch.Tensor, running: list) -> list[int]:
        """The next token of every slot (B,) (0 for a free one), from the running rows' logits (R, vocab), or every
        slot's (B, vocab), as a compiled step computes them, of which the running rows' are kept."""
        if len(logits) != len(running):
            logits = logits[torch.tensor([slot for slot, _ in running], device=logits.device)]  # (R, vocab)
        picked, drawn = self._draw(logits, running)
        if len(running) == self.max_batch_size:
            self._tokens.copy_(picked[:, None])
            return drawn
        tokens, slots = [0] * self.max_batch_size, [slot for slot, _ in running]
        self._tokens[torch.tensor(slots, device=self.device)] = picked[:, None].to(self._tokens.device)
        for slot, token in zip(slots, drawn):
            tokens[slot] = token
        return tokens

    def _draw(self, logits: torch.Tensor, running: list) -> tuple[torch.Tensor, list[int]]:
        """The next token of each of the rows `running` [(slot, row)] from their logits (len(running), vocab), in that
        order: on the device and read back."""
        s = running[0][1].request.sampling
        uniforms = torch.cat([torch.rand(1, generator=row.generator, dtype=torch.float64, device=self.device)
                              for _, row in running]).to(logits.device)
        picked = inverse_cdf_sample(sampling_probs(logits, s.temperature, s.top_k, s.top_p), uniforms)
        tokens = picked.tolist()
        if any(t < 0 for t in tokens):
            raise LitLLMError("the policy's next-token probabilities are not finite (NaN or inf logits): the "
                              "weights diverged; lower the learning rate or resume from an earlier checkpoint")
        return picked, tokens


@contextmanager
def merged_lora(model: nn.Module) -> Iterator[nn.Module]:
    """Inside the block, `model`'s LoRA layers compute their no-grad forwards (decoding) from `W + scaling * B @ A`
    (computed in fp32, in W's dtype) in a buffer of their own, made on entry and freed at exit: one matmul per layer
    and decode step instead of three. W, A and B are untouched (no in-place merge and un-merge, which would not
    restore W bit for bit) and a forward that records gradients runs the live adapters. The outputs equal the live
    layers' up to float rounding. A layer on a quantized base, or switched off (`disable_adapters`), stays live.
    Costs one copy of the adapted Linears' weights (with q and v, the attention's fused qkv) for the block; each
    merged weight is the layer's buffer `merged_weight` (non-persistent) for the block."""
    from litllm.lora import LoRALinear

    patched = []
    for module in model.modules():
        if not isinstance(module, LoRALinear) or module.adapter_disabled or not module.enabled:
            continue
        base, weight = module.base, getattr(module.base, "weight", None)
        if type(base) is not nn.Linear or type(weight).__name__ != "Parameter" or not weight.is_floating_point():
            continue
        merged = (weight.detach().float() + module.delta_weight().to(weight.device)).to(weight.dtype)
        patched.append((module, module.__dict__.get("forward")))  # an instance's own forward (a wrapper's), if any
        # a buffer of the module while merged: a compiled decode step takes it by name (`<layer>.merged_weight`),
        # handed to it at load like the other weights (litllm.compile_decode)
        module.register_buffer(MERGED_BUFFER, merged, persistent=False)
        module.forward = _merged_forward(module)
    try:
        yield model
    finally:
        for module, own in patched:
            delattr(module, MERGED_BUFFER)
            if own is None:
                del module.forward  # the class's forward again
            else:
                module.forward = own


def _merged_forward(module: nn.Module):
    """`module`'s forward while gradients are recorded, else the plain Linear of its merged weight (out, in) and
    its base's bias; both read from the module at each call (as attributes: `torch.export` then knows them as the
    module's buffer and parameter, not as constants of the graph)."""
    forward = module.forward

    def merged_forward(x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():
            return forward(x)
        return F.linear(x, getattr(module, MERGED_BUFFER), module.base.bias)

    return merged_forward


def rollout_engine(module, rows: int, length: int, compile: Optional[bool], min_rows: int = 0) -> RolloutEngine:
    """The `RolloutEngine` of one rollout (`rows` rows of `length` positions), its decode step made by
    `litllm.compile_decode.step_engine` as `compile` says (CPU; None: only where a saved step fits and loads, none is
    compiled): the saved compiled step of max(rows, `min_rows`) rows (a run's smaller last batch decodes on its full
    batches' step, the extra rows idle) at the shortest saved KV-cache length that fits, else one compiled now at
    `length` rounded up as `compiled_length` does (so rollouts of other prompt lengths share it) and saved: it runs
    on the module's tensors as they are now (its weights, the merged LoRA buffers of `merged_lora`), handed to the
    step when the engine is built, so each rollout decodes with the current policy. A policy whose step does not
    export as one graph decodes eagerly for the rest of the run (one note).
    `engine.compile_seconds`: what building the compiled step took (load or compile); None when eager. A step this
    process compiled records its seconds in the compile ledger as the policy's decode step
    (`litllm.compile_ledger.record_step_compile`: the price later compiles of it, and of other models, are expected
    to take); a loaded one records nothing."""
    from litllm.compile_decode import step_engine
    from litllm.compile_ledger import record_step_compile

    def make(rows: int, length: int, compiled: bool) -> RolloutEngine:
        return RolloutEngine(module, None, max_batch_size=rows, max_seq_length=length, compile=compiled)

    engine = step_engine(make, module, rows, length, False if module in _EAGER_ONLY else compile,
                         min_rows=min_rows)
    if engine._compiled and engine.step_source not in COMPILED_AHEAD:  # did not export as one graph
        engine.close()  # (torch.compile's lazy path, which would compile each rollout's shapes): eager
        _EAGER_ONLY.add(module)  # for the rest of the run: no export tried again
        print("note: the policy's decode step does not export as one graph: the rollouts decode eagerly",
              file=sys.stderr)
        return make(rows, length, False)
    record_step_compile(module, engine)
    return engine


def sample_completions(module, prompts: Sequence[Sequence[int]], num_generations: int, max_new_tokens: int,
                       sampling: dict, seeds: Sequence[int], stop_token_ids: Sequence[int],
                       compile: Optional[bool] = False, min_rows: int = 0) -> tuple[list[list[int]], list[bool], float]:
    """(completion token ids (prompts x G, stop token included), truncated flags, seconds) sampled on one Engine.

    All prompts x G rows decode together, each prompt prefilled once (`add_many` shares it with its G - 1 other
    rows). The module decodes in eval mode (no dropout), its LoRA merged (`merged_lora`), and is put back in its mode
    afterwards, with its own modules (`kept_modules`: a compiled step's layout swaps Linears in place); the engine's KV
    cache (prompts x G rows of the longest prompt + max_new_tokens) lives only for this call. The engine gets no
    tokenizer: the stops are token ids and the rewards decode the completions themselves, so no token is detokenized
    here. `compile`: decode on the compiled step of at least `min_rows` rows
    (`rollout_engine`)."""
    rows = [list(map(int, p)) for p in prompts for _ in range(num_generations)]
    length = max(len(r) for r in rows) + max_new_tokens
    was_training = module.training
    module.eval()
    start = time.perf_counter()
    tokens: dict[int, list[int]] = {}
    finish: dict[int, Optional[str]] = {}
    try:
        # the compiled step's CPU layout (Linears swapped for OneRowLinear/RowSplitLinear on the same weights,
        # `unpack_weights`) is the rollout's only: the policy trains on its own modules
        with kept_modules(module), merged_lora(module), \
                rollout_engine(module, len(rows), length, compile, min_rows) as engine:
            requests = [Request(r, max_new_tokens, Sampling(seed=seed, **sampling), stop_token_ids=stop_token_ids)
                        for r, seed in zip(rows, seeds)]
            ids = engine.add_many(requests)
            while engine.has_unfinished:
                for out in engine.step():
                    tokens.setdefault(out.request_id, []).extend(out.token_ids)
                    if out.finished:
                        finish[out.request_id] = out.finish_reason
    finally:
        module.train(was_training)
    seconds = time.perf_counter() - start
    completions = [tokens.get(i, []) for i in ids]
    truncated = [finish.get(i) == "length" for i in ids]
    return completions, truncated, seconds


def pack(prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]], num_generations: int,
         device=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids (N, L), prompt_lens (N,), completion_mask (N, C)) of prompts x G completions, right-padded."""
    rows = [list(map(int, p)) for p in prompts for _ in range(num_generations)]
    width = max(len(c) for c in completions) or 1
    length = max(len(p) + len(c) for p, c in zip(rows, completions))
    input_ids = torch.zeros(len(rows), length, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, (p, c) in enumerate(zip(rows, completions)):
        input_ids[i, : len(p) + len(c)] = torch.tensor(p + list(c), dtype=torch.long)
        mask[i, : len(c)] = 1
    lens = torch.tensor([len(p) for p in rows], dtype=torch.long)
    return input_ids.to(device), lens.to(device), mask.to(device)
