"""Speculative decoding: a small draft model proposes `k` tokens, the model checks them in one forward.

    engine = SpeculativeEngine(model, draft, tokenizer, max_seq_length=512, num_speculative_tokens=4)
    engine.add(Request(prompt_ids, max_new_tokens=50))
    while engine.has_unfinished:
        for out in engine.step():          # the same Output as litllm.engine.Engine's
            print(out.text, end="")
    engine.acceptance_rate                 # accepted / proposed draft tokens

Decoding is bound by reading the weights once per step; a forward over k + 1 tokens reads them once
too. Each round the draft decodes k tokens (cheap: it is small), the target runs one forward over
the newest token and the k proposals, and keeps the longest prefix it agrees with plus one token of
its own, so a round yields 1 to k + 1 tokens for one read of the target's weights.

- Greedy (temperature 0): a proposal is kept while it is the target's argmax, and the first
  disagreement is replaced by the target's argmax: the output is token for token what decoding
  without a draft gives.
- Sampling: the standard rule (Leviathan et al. 2023; Chen et al. 2023): with the target's
  distribution p and the draft's q at a position (both after temperature, top-k, top-p), the
  draft's token x is kept with probability min(1, p(x) / q(x)); on the first rejection the
  token is drawn from norm(max(0, p - q)); when all k are kept, one more comes from p. Each token
  is then distributed exactly as sampling from the target alone.
- KV caches: both models' caches are addressed by position, and a query attends to positions up
  to its own only (`GPT.forward` with `input_pos`). Rejected proposals are rewound by lowering how
  many cache positions count as valid (`_valid`); their stale entries are overwritten before any
  query can reach them. The draft also has to catch up on tokens it never saw (the target's own
  token; after a fully accepted round also its last proposal): it runs them as one forward.

One sequence at a time (`add()` queues more; `generate`, `chat` and `LLM` decode one row). Each model's KV cache
is held by a one-row `litllm.engine.Engine` of its own: the draft's, whose decode step (one token) is eager or
compiled as plain decoding's is (`litllm.generate.speculative_engine`: the draft's `decode_engine`, same policy,
saved steps and caches), and the target's, whose check of the k proposals is one forward over k + 1 tokens: eager,
or a compiled step of that fixed shape (`litllm.compile_decode.verify_engine`, by the same policy, its rent or buy
priced apart from the draft's: saved and loaded as the decode steps are; a round that asks for fewer
proposals pads its tokens to the shape, the padding's cache entries rewound as rejected proposals are). Prompts
prefill eagerly. `litllm serve` batches rows: `SpeculativeBatchEngine` speculates in the steps where every running
row can (plain decoding, nothing waiting) and takes the engine's own batched step otherwise; with `compile` the
rounds' draft and verify steps are compiled once for one slot and loaded per slot, bound to its cache rows
(`litllm.compile_decode.slot_steps`).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from litllm.engine import (
    PREFILL_CHUNK, Engine, Output, Request, RequestError, StopMatcher, _merge, check_sampling_args, sampling_probs,
    threads_for,
)
from litllm.errors import LitLLMError


def check_same_vocabulary(tokenizer, draft_tokenizer, model, draft, draft_dir: Path) -> None:
    """One clear line unless the draft model reads and writes the target's tokens."""
    vocab, draft_vocab = tokenizer.processor.get_vocab(True), draft_tokenizer.processor.get_vocab(True)
    if vocab != draft_vocab or model.config.vocab_size != draft.config.vocab_size:
        raise LitLLMError(
            f"--draft_model {draft_dir}: its vocabulary ({len(draft_vocab)} tokens, {draft.config.vocab_size} logits) "
            f"differs from the model's ({len(vocab)} tokens, {model.config.vocab_size} logits): "
            "a draft must use the same tokenizer"
        )


def accept_proposals(
    proposed: list[int],
    p: torch.Tensor,
    q: Optional[torch.Tensor],
    generator: Optional[torch.Generator] = None,
) -> tuple[int, int]:
    """(how many of the k `proposed` tokens are kept, the token that follows them).

    p: (k + 1, V) the target's distributions at the k proposals' positions and the one after;
    q: (k, V) the draft's, from which `proposed` were drawn; None for greedy decoding, where p holds
    the target's logits (or anything whose argmax is its choice).
    """
    k = len(proposed)
    if q is None:
        choice = p.argmax(dim=-1).tolist()  # (k + 1,)
        kept = next((i for i in range(k) if proposed[i] != choice[i]), k)
        return kept, choice[kept]
    index = torch.arange(k, device=p.device)
    ids = torch.tensor(proposed, device=p.device, dtype=torch.long)
    ratio = (p[index, ids] / q[index, ids]).clamp(max=1.0)  # (k,) acceptance probabilities
    uniform = torch.rand(k, generator=generator, device=p.device)
    rejected = (uniform >= ratio).tolist()
    kept = next((i for i in range(k) if rejected[i]), k)
    if kept == k:
        target = p[k]
    else:
        target = (p[kept] - q[kept]).clamp(min=0.0)  # the mass the draft under-proposed
        if float(target.sum()) <= 0:  # p == q there (rejection then has probability 0): p itself
            target = p[kept]
    return kept, int(torch.multinomial(target / target.sum(), 1, generator=generator))


@dataclass
class _Sequence:
    """The request being decoded."""

    request_id: int
    request: Request
    matcher: StopMatcher
    generator: Optional[torch.Generator]
    tokens: list[int]  # prompt + generated; the last one is in neither cache yet
    valid: list[int]  # [target, draft]: how many leading cache positions hold these tokens' keys/values
    generated: int = 0


def own_caches(engine: Engine) -> Engine:
    """`engine` with its KV cache set on its model (another engine of the same model, or a draft that is the model
    itself, may have set its own meanwhile)."""
    if engine.model.blocks[0].attn.kv_cache is not engine._caches[0]:
        engine._set_caches(engine._caches)
    return engine


def eager_forward(engine: Engine, ids: list[int], start: int, all_logits: bool = False) -> torch.Tensor:
    """Logits (T or 1, V) of one-row `engine`'s model over `ids` written at positions start.. of its KV cache, one
    eager forward (how the rounds check proposals, and the draft catches up, without a compiled step)."""
    own_caches(engine)
    stop = start + len(ids)
    idx = torch.tensor(ids, dtype=torch.long, device=engine.device)[None]
    logits = engine.model.decode(idx, input_pos=torch.arange(start, stop, device=engine.device), kv_len=stop,
                                 logits_to_keep=None if all_logits else 1)
    return logits[0, :, : engine.vocab_size]


def propose(logits: torch.Tensor, sampling, generator, draft_probs: list) -> int:
    """The draft's next token from its logits (V,): greedy, or sampled (its distribution kept in `draft_probs`)."""
    if sampling.temperature <= 0:
        return int(logits.argmax())
    draft_probs.append(sampling_probs(logits, sampling.temperature, sampling.top_k, sampling.top_p))
    return int(torch.multinomial(draft_probs[-1], 1, generator=generator))


def check_proposals(proposed: list[int], draft_probs: list, logits: torch.Tensor, sampling, generator):
    """`accept_proposals` for the model's logits (k + 1, V) at the proposals: greedy, or by the sampling rule."""
    if sampling.temperature <= 0:
        return accept_proposals(proposed, logits, None)
    return accept_proposals(proposed, sampling_probs(logits, sampling.temperature, sampling.top_k, sampling.top_p),
                            torch.stack(draft_probs) if draft_probs else logits[:0], generator)


class SpeculativeEngine:
    """`litllm.engine.Engine`'s interface (add, step, abort, has_unfinished, close) for one row, decoding
    with a draft model. Sets both models' KV caches for its lifetime; `close()` removes them.

    `draft_engine`, `target_engine`: the one-row Engines (`litllm.generate.speculative_engine` makes them with
    compiled steps) whose KV caches and steps the rounds use: the draft's decode step, the target's `verify` (see
    `litllm.compile_decode.verify_engine`; None: an eager forward); by default eager Engines of `max_seq_length`."""

    def __init__(
        self,
        model,
        draft,
        tokenizer,
        max_seq_length: Optional[int] = None,
        *,
        num_speculative_tokens: int = 4,
        threads: Optional[int] = None,
        prefill_chunk: int = PREFILL_CHUNK,
        draft_engine: Optional[Engine] = None,
        target_engine: Optional[Engine] = None,
    ) -> None:
        if num_speculative_tokens < 1:
            raise LitLLMError(f"--num_speculative_tokens must be >= 1, got {num_speculative_tokens}")
        if draft.config.vocab_size != model.config.vocab_size:
            raise LitLLMError(f"the draft model has {draft.config.vocab_size} logits, the model {model.config.vocab_size}:"
                              " a draft must use the same tokenizer")
        self.max_seq_length = max_seq_length or model.max_seq_length
        for name, m in (("model", model), ("draft model", draft)):
            if self.max_seq_length > m.max_seq_length:
                raise LitLLMError(f"max_seq_length {self.max_seq_length} exceeds the {name}'s context window of "
                                  f"{m.max_seq_length}")
        self.tokenizer = tokenizer
        self.k = num_speculative_tokens
        self.threads = threads
        self.prefill_chunk = prefill_chunk
        self.vocab_size = model.config.vocab_size
        self.device = model.wte.weight.device
        if target_engine is None:
            target_engine = Engine(model, tokenizer, 1, self.max_seq_length, threads=threads)
        if draft_engine is None:
            draft_engine = Engine(draft, tokenizer, 1, self.max_seq_length, threads=threads)
        self.engines = (target_engine, draft_engine)  # each holds its model's KV cache
        self._waiting: deque[tuple[int, Request]] = deque()
        self._aborts: set[int] = set()
        self._next_id = 0
        self._row: Optional[_Sequence] = None
        self.proposed = self.accepted = 0  # draft tokens over the engine's life
        self.rounds = 0  # the model's checks (verify steps) over the engine's life

    # ------------------------------------------------------------------ Engine's interface
    def add(self, request: Request) -> int:
        n = len(request.prompt_ids)
        if n == 0:
            raise LitLLMError("the prompt is empty (no tokens)")
        s = request.sampling
        check_sampling_args(s.temperature, s.top_k, s.top_p, request.max_new_tokens)
        if n + request.max_new_tokens > self.max_seq_length:
            raise LitLLMError(
                f"the prompt has {n} tokens and max_new_tokens is {request.max_new_tokens}: together they exceed "
                f"the context window of {self.max_seq_length} tokens; shorten the prompt or lower max_new_tokens"
            )
        request_id = self._next_id
        self._next_id += 1
        self._waiting.append((request_id, request))
        return request_id

    def abort(self, request_id: int) -> None:
        self._aborts.add(request_id)

    @property
    def num_running(self) -> int:
        return int(self._row is not None)

    @property
    def has_unfinished(self) -> bool:
        return bool(self._waiting) or self._row is not None

    @property
    def acceptance_rate(self) -> Optional[float]:
        """Accepted / proposed draft tokens so far (None before any proposal)."""
        return self.accepted / self.proposed if self.proposed else None

    def close(self) -> None:
        for engine in self.engines:
            engine.close()

    def __enter__(self) -> "SpeculativeEngine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @torch.inference_mode()
    def step(self) -> list[Output]:
        """Start the next request (prefill, first token) or run one speculation round; at most one Output."""
        with threads_for(self.threads):
            aborted = self._handle_aborts()
            if aborted:
                return aborted
            if self._row is None:
                if not self._waiting:
                    return []
                return [self._start(*self._waiting.popleft())]
            return [self._round()]

    # ------------------------------------------------------------------ internals
    def _caches_of(self, which: int) -> Engine:
        """Model `which`'s (0 target, 1 draft) Engine, its KV cache set on the model."""
        return own_caches(self.engines[which])

    def _forward(self, which: int, ids: list[int], start: int, all_logits: bool = False) -> torch.Tensor:
        """Logits (T or 1, V) of model `which` (0 target, 1 draft) over `ids` written at positions start.., eager."""
        return eager_forward(self.engines[which], ids, start, all_logits)

    def _start(self, request_id: int, request: Request) -> Output:
        """Prefill both caches with the prompt (in chunks) and take the target's first token."""
        prompt = [int(i) for i in request.prompt_ids]
        for which in (1, 0):  # the target last: its logits pick the first token
            for start in range(0, len(prompt), self.prefill_chunk):
                logits = self._forward(which, prompt[start: start + self.prefill_chunk], start)
        s = request.sampling
        generator = None
        if s.seed is not None and s.temperature > 0:
            generator = torch.Generator(device=self.device).manual_seed(s.seed)
        matcher = StopMatcher(self.tokenizer, request.stop_strings, request.stop_token_ids)
        self._row = _Sequence(request_id, request, matcher, generator, prompt, [len(prompt)] * 2)
        return self._emit([self._pick(logits[-1])])

    def _pick(self, logits: torch.Tensor) -> int:
        s = self._row.request.sampling
        if s.temperature <= 0:
            return int(logits.argmax())
        probs = sampling_probs(logits, s.temperature, s.top_k, s.top_p)
        return int(torch.multinomial(probs, 1, generator=self._row.generator))

    def _round(self) -> Output:
        """Draft k tokens, check them with one target forward, keep the agreed prefix and the target's next."""
        row = self._row
        tokens, valid, s = row.tokens, row.valid, row.request.sampling
        pos = len(tokens) - 1  # the newest token: in neither cache yet
        k = min(self.k, row.request.max_new_tokens - row.generated - 1)  # never more than the request wants
        proposed, draft_probs = [], []
        # the draft decodes on the engine's thread count, not its own pick: switching OpenMP's count twice a round
        # (a draft at 2, the model at 1) made a compiled round 4-17x slower (2-core Xeon, benchmarks/speculative.py)
        for _ in range(k):
            pending = tokens[valid[1]:] + proposed[-1:]  # what the draft hasn't seen
            logits = self._draft(pending, pos + len(proposed) + 1 - len(pending))
            valid[1] = pos + len(proposed) + 1
            proposed.append(propose(logits, s, row.generator, draft_probs))
        logits = self._verify(tokens[pos:] + proposed, pos)  # (k + 1, V)
        kept, token = check_proposals(proposed, draft_probs, logits, s, row.generator)
        self.proposed += k
        self.accepted += kept
        self.rounds += 1
        # rewind: cache positions past the kept tokens no longer count (the draft never wrote its last proposal)
        valid[0] = pos + kept + 1
        valid[1] = min(valid[1], pos + kept + 1)
        return self._emit(proposed[:kept] + [token])

    def _draft(self, ids: list[int], start: int) -> torch.Tensor:
        """The draft's logits (V,) after `ids` written at positions start..: through its engine's decode step, one
        token at a time (1 or 2 tokens: the target's own, after a fully accepted round also the last proposal), or
        several at once in one eager forward."""
        engine = self._caches_of(1)
        if len(ids) > 1 and not engine._compiled:
            return self._forward(1, ids, start)[-1]
        for i, token in enumerate(ids):
            engine._tokens[0, 0], engine._pos[0, 0] = token, start + i
            logits = engine._decode(engine._tokens, engine._pos, start + i + 1)
        return logits[0]

    def _verify(self, ids: list[int], start: int) -> torch.Tensor:
        """The target's logits (len(ids), V) over `ids` (the newest token and the proposals) written at positions
        start..: its compiled verify step where one is bound (`ids` padded to its width with the last token, whose
        cache entries past the kept ones no later query reads before they are written again) and the padding fits
        the cache, else an eager forward."""
        engine = self._caches_of(0)
        width = self.k + 1
        if getattr(engine, "verify", None) is None or start + width > engine.max_seq_length:
            return self._forward(0, ids, start, all_logits=True)
        padded = ids + ids[-1:] * (width - len(ids))
        engine.verify_tokens.copy_(torch.tensor(padded, dtype=torch.long)[None])
        engine.verify_pos.copy_(torch.arange(start, start + width)[None])
        return engine.verify(engine.verify_tokens, engine.verify_pos, start + width)[: len(ids)]

    def _emit(self, new: list[int]) -> Output:
        """Append the new tokens to the row (up to a stop or max_new_tokens) and say what they produced."""
        row = self._row
        request, matcher = row.request, row.matcher
        text, used, reason = "", [], None
        for token in new:
            row.tokens.append(token)
            row.generated += 1
            used.append(token)
            text += matcher.push(token)
            if matcher.stopped:
                reason = "stop"
            elif row.generated >= request.max_new_tokens:
                reason = "length"
                text += matcher.flush()
            if reason:
                self._row = None
                break
        return Output(row.request_id, text, used, reason is not None, reason, len(request.prompt_ids), row.generated)

    def _handle_aborts(self) -> list[Output]:
        if not self._aborts:
            return []
        outputs = [Output(i, "", [], True, "abort", len(r.prompt_ids), 0) for i, r in self._waiting if i in self._aborts]
        self._waiting = deque((i, r) for i, r in self._waiting if i not in self._aborts)
        row = self._row
        if row is not None and row.request_id in self._aborts:
            outputs.append(Output(row.request_id, "", [], True, "abort", len(row.request.prompt_ids), row.generated))
            self._row = None
        self._aborts.clear()
        return outputs


class SpeculativeBatchEngine(Engine):
    """`litllm.engine.Engine` (continuous batching, `litllm serve`) that speculates with a draft model whenever it
    can: in a step where no request waits, none is prefilling and every running row is plain decoding (no
    logprobs, no grammar), each row runs one round of `SpeculativeEngine`'s (the draft proposes, the target checks
    them in one forward over the row's slot, the cache is rewound by lowering the row's position); in any other
    step, the engine's own batched decode step. Greedy output is token for token the engine's without a draft.

    The draft keeps its own KV cache of the same slots; a slot's draft positions are valid up to
    `_draft_valid[slot]` for the request `_draft_owner[slot]`, and it catches up on the tokens it missed (the
    model's own token, after a fully accepted round also its last proposal, one more per plain step of the engine,
    a new request's prompt): with `compile`, up to 2 tokens on its compiled one-token step, up to k + 1 on a compiled
    step of k + 1 tokens (padded as the verify step is), more in one eager forward (measured side by side,
    `benchmarks/draft_catch_up.py`: a GEMM over the tokens is then the faster); eager, in one forward."""

    def __init__(self, model, draft, tokenizer, max_batch_size: int = 1, max_seq_length: Optional[int] = None, *,
                 num_speculative_tokens: int = 4, **engine_args) -> None:
        if num_speculative_tokens < 1:
            raise LitLLMError(f"--num_speculative_tokens must be >= 1, got {num_speculative_tokens}")
        if draft.config.vocab_size != model.config.vocab_size:
            raise LitLLMError(f"the draft model has {draft.config.vocab_size} logits, the model {model.config.vocab_size}:"
                              " a draft must use the same tokenizer")
        from litllm import compile_decode

        t0 = compile_decode.clock()
        super().__init__(model, tokenizer, max_batch_size, max_seq_length, **engine_args)
        if self._compiled:
            self._warm_up()
            self.compile_seconds = compile_decode.clock() - t0  # what building the batched step took
        if self.max_seq_length > draft.max_seq_length:
            raise LitLLMError(f"max_seq_length {self.max_seq_length} exceeds the draft model's context window of "
                              f"{draft.max_seq_length}")
        self.draft, self.k = draft, num_speculative_tokens
        draft.set_kv_cache(max_batch_size, self.max_seq_length)
        self._draft_slots = [[block.attn.kv_cache.rows(i, i + 1) for block in draft.blocks]
                             for i in range(max_batch_size)]
        self._draft_owner: list[Optional[int]] = [None] * max_batch_size
        self._draft_valid = [0] * max_batch_size
        self._generated: dict[int, list[int]] = {}  # request id -> its tokens so far (the draft needs them)
        self.proposed = self.accepted = 0  # draft tokens over the engine's life
        # compiled: one step per slot, bound to its cache rows (the draft's of one token and of k + 1, the verify step)
        self._draft_steps = self._draft_wide_steps = self._verify_steps = None
        if self._compiled:
            self._compile_rounds()

    def _warm_up(self) -> None:
        """A batched CPU step that `torch.compile` makes (the model does not export as one graph) compiles at its
        first run: run it once now (every slot's dummy token at its parking position, as a step's free slots
        decode), so that `compile_seconds` covers that compile as `litllm.generate.decode_engine`'s warm-up does."""
        if getattr(self, "step_source", None) == "torch.compile" and self.device.type == "cpu":
            with torch.inference_mode(), threads_for(self.threads):
                self._decode(self._tokens, self._pos, None)

    def _compile_rounds(self) -> None:
        """With `compile` (the engine's own batched step compiled): the draft's one-token step, its step of k + 1
        tokens (its catch-ups) and the model's verify step of k + 1 tokens compiled once for one slot and loaded per
        slot (`litllm.compile_decode.slot_steps`); where they can't be (off the CPU, no single graph), the rounds
        stay eager. What this process compiled, the batched step included, is recorded in the compile ledger under
        its model and step (`litllm.compile_ledger.record_step_compile`: the decode step's kind for the batched step
        and the draft's one-token step, the verify step's for the steps of k + 1 tokens); a loaded step, nothing."""
        from litllm.compile_decode import _DecodeStep, _verify_kind, _VerifyStep, slot_steps
        from litllm.compile_ledger import record_step_compile

        row = dict(dtype=torch.long, device=self.device)
        self._draft_tokens, self._draft_pos = torch.zeros(1, 1, **row), torch.zeros(1, 1, **row)
        width = self.k + 1
        self._verify_tokens, self._verify_pos = torch.zeros(1, width, **row), torch.arange(width, **row)[None]
        self._draft_steps = slot_steps(self.draft, self._draft_slots, _DecodeStep(self.draft),
                                       {"tokens": self._draft_tokens, "pos": self._draft_pos})
        wide = {"tokens": self._verify_tokens, "pos": self._verify_pos}  # (1, k + 1): the steps over k + 1 tokens
        self._verify_steps = slot_steps(self.model, self._slot_caches, _VerifyStep(self.model), wide,
                                        _verify_kind(width))
        self._draft_wide_steps = slot_steps(self.draft, self._draft_slots, _VerifyStep(self.draft), wide,
                                            _verify_kind(width))
        for model, steps, kind in ((self.model, self, ""), (self.draft, self._draft_steps, ""),
                                   (self.model, self._verify_steps, _verify_kind(width)),
                                   (self.draft, self._draft_wide_steps, _verify_kind(width))):
            record_step_compile(model, steps, kind)

    @property
    def acceptance_rate(self) -> Optional[float]:
        """Accepted / proposed draft tokens so far (None before any proposal)."""
        return self.accepted / self.proposed if self.proposed else None

    def close(self) -> None:
        super().close()
        self.draft.clear_kv_cache()

    @torch.inference_mode()
    def step(self) -> list[Output]:
        running = [(slot, row) for slot, row in enumerate(self._rows) if row is not None]
        can_speculate = (running and not self._waiting and not self._prefilling and not self._aborts
                         and all(row.decoding and row.request.logprobs is None and row.constraint is None
                                 for _, row in running))
        if not can_speculate:
            outputs = super().step()
        else:
            outputs, self._failed = [], {}
            if self.model.blocks[0].attn.kv_cache is not self._caches[0]:
                self._set_caches(self._caches)
            with threads_for(self.threads):
                for slot, row in running:
                    try:
                        self._round(slot, row, outputs)
                    except Exception as e:  # this row only (sampling, detokenizing)
                        self._fail(slot, row, e)
            outputs = _merge(outputs)
            if self._failed:
                failed, self._failed = self._failed, {}
                raise RequestError(failed, [out for out in outputs if out.request_id not in failed])
        for out in outputs:  # each running request's tokens, for the draft to catch up on
            if out.finished:
                self._generated.pop(out.request_id, None)
            else:
                self._generated.setdefault(out.request_id, []).extend(out.token_ids)
        return outputs

    def _draft_logits(self, slot: int, ids: list[int], start: int) -> torch.Tensor:
        """The draft's last logits (vocab,) over `ids` written at positions start.. of its cache slot: compiled, up to
        2 tokens one at a time and up to k + 1 at once (padded, where the padding fits the cache), else in eager
        chunks (see the class doc)."""
        if self._draft_steps is not None and len(ids) <= 2:  # the compiled step, one token at a time
            for i, token in enumerate(ids):
                self._draft_tokens[0, 0], self._draft_pos[0, 0] = token, start + i
                logits = self._draft_steps[slot](self._draft_tokens, self._draft_pos, start + i + 1)
            return logits[0, : self.vocab_size]
        if self._draft_wide_steps is not None and self._fill_wide(ids, start):
            width = self.k + 1
            logits = self._draft_wide_steps[slot](self._verify_tokens, self._verify_pos, start + width)  # (1, width, V)
            return logits[0, len(ids) - 1, : self.vocab_size]
        for block, cache in zip(self.draft.blocks, self._draft_slots[slot]):
            block.attn.kv_cache = cache
        for begin in range(0, len(ids), self.prefill_chunk):
            chunk = ids[begin: begin + self.prefill_chunk]
            stop = start + begin + len(chunk)
            idx = torch.tensor(chunk, dtype=torch.long, device=self.device)[None]
            logits = self.draft.decode(idx, input_pos=torch.arange(stop - len(chunk), stop, device=self.device), kv_len=stop)
        return logits[0, -1, : self.vocab_size]

    def _round(self, slot: int, row, outputs: list[Output]) -> None:
        """One speculation round for the row in `slot` (see `SpeculativeEngine._round`), its tokens advanced as
        the engine's decode step advances one."""
        s, pos = row.request.sampling, row.pos  # the newest token, at pos: in neither cache yet
        tokens = list(row.request.prompt_ids) + self._generated.get(row.request_id, [])  # (pos + 1,)
        if self._draft_owner[slot] != row.request_id:
            self._draft_owner[slot], self._draft_valid[slot] = row.request_id, 0
        k = min(self.k, row.request.max_new_tokens - row.generated - 1)
        proposed, draft_probs = [], []
        for _ in range(k):
            done = self._draft_valid[slot]
            logits = self._draft_logits(slot, (tokens + proposed)[done: pos + len(proposed) + 1], done)
            self._draft_valid[slot] = pos + len(proposed) + 1
            proposed.append(propose(logits, s, row.generator, draft_probs))
        logits = self._verify(slot, tokens[pos:] + proposed, pos)  # (k + 1, vocab)
        kept, token = check_proposals(proposed, draft_probs, logits, s, row.generator)
        self.proposed += k
        self.accepted += kept
        self._draft_valid[slot] = min(self._draft_valid[slot], pos + kept + 1)  # rewind the rejected proposals
        for new in proposed[:kept] + [token]:
            row.pos += 1
            self._advance(slot, row, new, outputs)
            if self._rows[slot] is not row:  # finished (stop, length)
                return
        self._tokens[slot] = token
        self._pos[slot] = row.pos

    def _fill_wide(self, ids: list[int], start: int) -> bool:
        """Put `ids` at positions start.. into the input buffers of the compiled steps of k + 1 tokens, padded with
        the last token (its cache entries past the valid positions are written again before a query reads them);
        False (nothing put) where they are more than k + 1 or the padding would run past the cache."""
        width = self.k + 1
        if len(ids) > width or start + width > self.max_seq_length:
            return False
        self._verify_tokens.copy_(torch.tensor(ids + ids[-1:] * (width - len(ids)), dtype=torch.long)[None])
        self._verify_pos.copy_(torch.arange(start, start + width)[None])
        return True

    def _verify(self, slot: int, ids: list[int], start: int) -> torch.Tensor:
        """The model's logits (len(ids), vocab) over `ids` (the newest token and the proposals) written at positions
        start.. of the slot's cache: its compiled verify step (padded as `SpeculativeEngine._verify` pads) where
        there is one and the padding fits, else an eager forward over the slot's cache rows."""
        if self._verify_steps is not None and self._fill_wide(ids, start):
            logits = self._verify_steps[slot](self._verify_tokens, self._verify_pos, start + self.k + 1)  # (1, k+1, V)
            return logits[0, : len(ids), : self.vocab_size]
        stop = start + len(ids)
        self._set_caches(self._slot_caches[slot])
        try:
            return self.model.decode(torch.tensor(ids, dtype=torch.long, device=self.device)[None],
                                     input_pos=torch.arange(start, stop, device=self.device), kv_len=stop,
                                     logits_to_keep=None)[0, :, : self.vocab_size]
        finally:
            self._set_caches(self._caches)
