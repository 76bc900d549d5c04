"""The decode engine: every generation in litllm (`generate`, `chat`, `LLM`, lm-eval's generate_until,
the server) runs here.

    engine = Engine(model, tokenizer, max_batch_size=4)
    rid = engine.add(Request(prompt_ids, max_new_tokens=50, stop_strings=["\\n\\n"]))
    while engine.has_unfinished:
        for out in engine.step():          # Output(request_id, text, token_ids, finished, ...)
            print(out.text, end="")

- Slots (continuous batching): the KV cache has `max_batch_size` rows. A request is admitted into a
  free row at a token boundary, while the other rows are mid-decode, and leaves when it finishes.
  Each row sits at its own length: the model gets a (B, 1) position tensor that is both the cache
  slot and the RoPE position, so no padding is needed and a row's output equals running it alone.
- Chunked prefill: each `step()` prefills at most `prefill_chunk` prompt tokens (admission order; a
  long prompt goes on over several steps), then decodes one token for every row whose prompt is in.
  So a long prompt stalls the running rows for one chunk's forward at a time, and a short prompt
  behind a long one gets its first token without waiting for the whole queue. A request's first
  token is sampled as soon as its own last chunk is in; a step that finds no row decoding returns the first
  tokens it sampled before any decode step (the next step decodes them), so on an idle engine the time to the
  first token is the prefill's. A prompt that fits one chunk (any prompt of `litllm generate`, unless long) is
  one forward, as without chunking.
- The decode step (`model.decode(tokens, input_pos=positions)` for all rows) reads no value back from the
  device. The engine passes `kv_len`, a host-side bound on the rows' lengths, so attention skips the unwritten
  tail of the cache: eager, and in a compiled CPU step (`litllm.compile_decode`: the attended length is a dynamic
  dimension of the saved step, rounded up to a bucket); a `torch.compile`d step (CUDA graphs) has static shapes
  and attends over the whole cache.
- Logprobs: a request with `logprobs` (and/or `prompt_logprobs`) gets each token's log-probability and its
  k most likely alternatives; only the rows that ask are scored (one gather + topk over their logits, read
  back with the sampled tokens), the others' decode step is unchanged.
- Shared prefill: `add_many` requests with the same prompt (the n choices of one API request) prefill
  it once; the first's KV rows are copied into the others' slots, and each samples on with its own generator.
- Constrained decoding: a request with a `grammar` (`litllm.constrain`, structured output) has its row's logits
  masked before sampling and its tokens followed by the grammar; only those rows pay for it.
- Prefix caching (`prefix_caching=True`): a slot keeps the KV of its prompt after its request leaves; a new
  prompt that starts with tokens some slot holds (free or running) takes that slot, or has that KV copied into
  its own, and prefills only the rest. The cache is the slots themselves: no memory beyond the KV cache, and a
  held prefix is simply overwritten when its free slot is needed, so it never keeps a request waiting.
- Stops: one `StopMatcher` per request: token-id stops (EOS, the prompt style's stop tokens) and text
  stops matched on the incrementally decoded text; text that could begin a stop string is held back
  until resolved, and the stop string itself is never emitted.
"""

from __future__ import annotations

import sys
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch

from litllm.errors import LitLLMError
from litllm.quantize import step_rounding
from litllm.utils import temporarily


# ---------------------------------------------------------------------- sampling
def sample(
    logits: torch.Tensor,
    temperature: float = 0.0,
    top_k: Optional[int] = None,
    top_p: float = 1.0,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """Pick the next token of each row of `logits` (..., vocab) -> (...,) long.

    temperature 0 is greedy (argmax); otherwise softmax(logits / temperature) restricted to the
    `top_k` most likely tokens and to the smallest set whose probability reaches `top_p` (nucleus).
    """
    if temperature <= 0:
        return greedy(logits)
    probs = sampling_probs(logits, temperature, top_k, top_p)
    flat = probs.reshape(-1, probs.size(-1))
    return torch.multinomial(flat, 1, generator=generator).reshape(probs.shape[:-1])


def greedy(logits: torch.Tensor) -> torch.Tensor:
    """`logits.argmax(dim=-1)`, (..., vocab) -> (...,) long; 16-bit CPU logits converted to fp32 first (exact: the same
    index), where torch's argmax is a slower scalar loop: over 32000 bf16 logits right after a decode step (caches
    cold) 193 vs 129 us on a 2-core AVX2 EPYC, warm 142 vs 43 (fp32 logits: 82 us cold; issue #27)."""
    if logits.dtype in (torch.bfloat16, torch.float16) and logits.device.type == "cpu":
        logits = logits.float()
    return logits.argmax(dim=-1)


def sampling_probs(logits: torch.Tensor, temperature: float, top_k: Optional[int] = None,
                   top_p: float = 1.0) -> torch.Tensor:
    """The distribution `sample` draws from (temperature > 0): (..., vocab) float probabilities.

    top_k keeps the tokens whose logit reaches the k-th largest (ties with it stay too); top_p (the nucleus) drops a
    token when the tokens ranked above it already hold top_p of the mass (the top token always stays, and so does a
    token tied with a kept one). The nucleus is found among the largest few logits: the top_k survivors, else a window
    of the largest probabilities that grows until it holds the nucleus (`nucleus_floor_of_vocabulary`)."""
    logits = logits.float()
    if temperature == 1.0 and top_k is None and top_p >= 1.0:
        return logits.softmax(dim=-1)  # softmax shifts by the max itself: the same values, bit for bit, in 1 op of 4
    # shifted so the top logit is 0 first: a tiny temperature then sends the others to -inf (never +inf - inf = NaN)
    logits = (logits - logits.amax(dim=-1, keepdim=True)) / temperature
    vocab = logits.size(-1)
    if top_k is not None and top_k < vocab:
        if top_p < 1.0:
            ranked = top_k_ranked(logits, top_k)  # (..., >= k) descending
            nucleus = nucleus_floor(ranked, ranked_softmax(ranked, vocab), top_p)
            # the k-th logit's floor holds where the nucleus keeps a -inf (the survivors' mass rounded below top_p)
            floor = torch.maximum(ranked[..., top_k - 1: top_k], nucleus)
        else:
            floor = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < floor, float("-inf"))
    elif top_p < 1.0:
        probs = logits.softmax(dim=-1)
        logits = logits.masked_fill(probs < nucleus_floor_of_vocabulary(probs, top_p), float("-inf"))
    return logits.softmax(dim=-1)


def top_k_ranked(logits: torch.Tensor, k: int) -> torch.Tensor:
    """The logits top_k keeps (those >= the k-th largest), descending: (..., k), or where a row keeps more (ties with
    its k-th logit) (..., the most any row keeps) with -inf after each row's own. k + 1 are taken to see the ties."""
    ranked = logits.topk(k + 1, dim=-1).values  # (..., k + 1)
    kth = ranked[..., k - 1: k]  # (..., 1)
    if not bool(((ranked[..., k:] == kth) & (kth > float("-inf"))).any()):  # -inf ties: all the finite ones are in
        return ranked[..., :k]
    ranked = logits.topk(int((logits >= kth).sum(dim=-1).max()), dim=-1).values
    return ranked.masked_fill(ranked < kth, float("-inf"))


def ranked_softmax(ranked: torch.Tensor, vocab: int) -> torch.Tensor:
    """softmax of `ranked` (..., w), descending logits then -inf, bit for bit the first w values of the softmax of its
    whole sorted row (`vocab` wide, -inf after `ranked`'s): torch's CPU softmax sums the exponentials in vector lanes,
    so w padded with -inf (each adds 0) to a multiple of 64 (whole 8- and 16-float vectors), or to `vocab` if that is
    less, adds the same numbers in the same lanes as the whole row."""
    width = min(-(-ranked.size(-1) // 64) * 64, vocab)
    padded = torch.nn.functional.pad(ranked, (0, width - ranked.size(-1)), value=float("-inf"))
    return padded.softmax(dim=-1)[..., : ranked.size(-1)]


def nucleus_floor(ranked: torch.Tensor, probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """The least of `ranked` (..., w), descending, that the nucleus keeps (..., 1), `probs` (..., w) their
    probabilities: a token stays when those ranked above it hold less than top_p (summed by cumsum, in float64 inside,
    as the sort's were)."""
    above = probs.cumsum(dim=-1) - probs  # (..., w) the mass ranked above each
    return ranked.masked_fill(above >= top_p, float("inf")).amin(dim=-1, keepdim=True)


def nucleus_floor_of_vocabulary(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """`nucleus_floor` of whole rows of `probs` (..., vocab), in probabilities (..., 1): found among the 64 largest,
    else the 1024 largest, else the whole row, the first window where every row drops a token (its floor is above the
    window's least). 1024 is skipped where 960 more tokens as likely as the 64th could not reach top_p: a nucleus
    that wide is ranked by sorting the whole row, as before (a window of 16384 measured 0.56 of a sort's time where it
    holds the nucleus, 1.7x where it does not: tutorials/inference_measurements.md, sampling-s35)."""
    vocab = probs.size(-1)
    width = min(64, vocab)
    while True:
        ranked = probs.topk(width, dim=-1).values  # (..., width) descending
        floor = nucleus_floor(ranked, ranked, top_p)
        if width == vocab or bool((floor > ranked[..., -1:]).all()):
            return floor
        reach = ranked.sum(dim=-1) + (1024 - width) * ranked[..., -1]
        width = 1024 if width < 1024 < vocab and bool((reach >= top_p).all()) else vocab


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, k: int) -> list["TokenLogprob"]:
    """The log-probability of each of `tokens` (N,) under `logits` (N, vocab) and the `k` most likely tokens'
    (log_softmax in float32), read back to the host."""
    logp = torch.log_softmax(logits.float(), dim=-1)  # (N, vocab)
    chosen = logp.gather(-1, tokens[:, None].long())[:, 0]  # (N,)
    top = logp.topk(k, dim=-1)  # (N, k) values and indices (k = 0: empty)
    rows = zip(tokens.tolist(), chosen.tolist(), top.indices.tolist(), top.values.tolist())
    return [TokenLogprob(token, value, list(zip(top_ids, top_values))) for token, value, top_ids, top_values in rows]


# the smallest positive temperature and top_p: float32's smallest normal value (sampling runs in float32, where
# a smaller one is 0 or a subnormal, and the division or comparison with it gives inf or NaN probabilities)
SMALLEST_NORMAL = torch.finfo(torch.float32).tiny
SEED_LIMIT = 2**64  # torch.Generator.manual_seed takes seeds in [0, 2**64) (and wraps negative ones)


class SamplingError(LitLLMError):
    """A sampling value the engine can't use. `field` is its name, the same as a flag of `generate`/`chat`
    (`--temperature`) and as a field of the server's requests; `problem` says what was expected."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"--{field} {problem}")
        self.field, self.problem = field, problem


def check_sampling_args(
    temperature: float, top_k: Optional[int], top_p: float, max_new_tokens: Optional[int], seed: Optional[int] = None,
) -> None:
    """Raise `SamplingError` for a value that would fail or be meaningless once sampling runs: the one check
    behind the CLI's flags, `LLM`'s arguments, the server's fields and `Engine.add`."""
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not (
            temperature == 0 or SMALLEST_NORMAL <= temperature <= sys.float_info.max):
        raise SamplingError("temperature", f"must be >= 0 (0 = greedy), and otherwise finite and at least "
                                           f"{SMALLEST_NORMAL:.4g} (float32's smallest normal value), "
                                           f"got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise SamplingError("top_k", f"must be a positive integer, got {top_k!r}")
    if isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not SMALLEST_NORMAL <= top_p <= 1.0:
        raise SamplingError("top_p", f"must be in (0, 1] (1 disables it) and at least {SMALLEST_NORMAL:.4g} "
                                     f"(float32's smallest normal value), got {top_p!r}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < SEED_LIMIT):
        raise SamplingError("seed", f"must be an integer in [0, 2**64), got {seed!r}")
    if max_new_tokens is not None and max_new_tokens < 1:
        raise SamplingError("max_new_tokens", f"must be >= 1, got {max_new_tokens}")


def lone_surrogate_at(text: str) -> Optional[int]:
    """Where the first character of `text` that UTF-8 can't encode is (a lone surrogate, e.g. from a JSON
    "\\ud800", which the tokenizer would raise on); None if there is none."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        return e.start
    return None


def check_text(text: str, what: str) -> None:
    at = lone_surrogate_at(text)
    if at is not None:
        raise LitLLMError(f"{what} holds a lone surrogate ({text[at]!a} at character {at}), which is not text")


# ---------------------------------------------------------------------- requests
@dataclass
class Sampling:
    temperature: float = 0.0  # 0 = greedy
    top_k: Optional[int] = None
    top_p: float = 1.0
    seed: Optional[int] = None  # a per-request torch.Generator; same seed -> same sample. None: torch's global RNG


@dataclass
class Request:
    prompt_ids: list[int]  # already rendered + tokenized by the caller
    max_new_tokens: int
    sampling: Sampling = field(default_factory=Sampling)
    stop_strings: Sequence[str] = ()  # text stops, matched on the decoded text
    stop_token_ids: Sequence[int] = ()  # EOS and the like (see `default_stops`)
    # log-probabilities (of the model's distribution, before temperature/top-k/top-p): None = not computed (no
    # cost); k >= 0 = each token's own and the k most likely alternatives'. `prompt_logprobs` scores the prompt
    # tokens (all but the first); with it, max_new_tokens may be 0 (score only)
    logprobs: Optional[int] = None
    prompt_logprobs: Optional[int] = None
    # constrained decoding (`litllm.constrain.Grammar`): each row's `grammar.start(stop_token_ids)` masks its logits
    # before sampling (logprobs stay the model's) and ends the row once the grammar is complete
    grammar: Optional[object] = None


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # the k most likely (token id, logprob), most likely first


@dataclass
class Output:
    """What one request produced in one `step()`."""

    request_id: int
    text: str  # new text since the previous Output (held back while it could begin a stop string)
    token_ids: list[int]  # the tokens generated in this step (a stop's tokens included)
    finished: bool
    finish_reason: Optional[str]  # "stop" | "length" | "abort" when finished
    prompt_tokens: int
    completion_tokens: int  # generated so far (a stop's tokens count)
    logprobs: Optional[list[TokenLogprob]] = None  # one per token of `token_ids`, when the request asked
    prompt_logprobs: Optional[list[Optional[TokenLogprob]]] = None  # in a request's first Output; [0] is None


class RequestError(LitLLMError):
    """`Engine.step()` failed for some requests only. They are dropped (rows freed); `errors` maps each one's
    id to its exception, `outputs` holds the step's Outputs of the others, which go on at the next step."""

    def __init__(self, errors: dict[int, Exception], outputs: list[Output]) -> None:
        request_id, error = next(iter(errors.items()))
        super().__init__(f"the engine failed on request {request_id}{' and others' if len(errors) > 1 else ''}: "
                         f"{type(error).__name__}: {error}")
        self.errors, self.outputs = errors, outputs


def default_stops(tokenizer, prompt_style=None) -> dict:
    """`stop_token_ids` and `stop_strings` for a Request: the tokenizer's EOS/stop ids and the style's stop
    strings, those that are one special token (`<|im_end|>`, `<|eot_id|>`, ...) as their token id."""
    strings = list(prompt_style.stop_strings) if prompt_style is not None else []
    ids, strings = split_special_stops(tokenizer, strings)
    return {"stop_token_ids": list(dict.fromkeys([*tokenizer.stop_ids, *ids])), "stop_strings": strings}


def split_special_stops(tokenizer, stop_strings: Sequence[str]) -> tuple[list[int], list[str]]:
    """(ids, strings): each stop string that is exactly one special token becomes that token's id.

    Stop strings are matched on text decoded with special tokens skipped, where a special token
    never shows up: `<|im_end|>` as text would never stop. Other strings stay text stops (a plain
    one-token string like "\n" may also appear inside other tokens, which only text matching catches).
    """
    ids, strings = [], []
    for text in stop_strings:
        if tokenizer is not None and text:
            encoded = tokenizer.encode(text, bos=False).tolist()
            if (len(encoded) == 1 and tokenizer.decode(encoded) == ""
                    and tokenizer.decode(encoded, skip_special_tokens=False) == text):
                ids.append(encoded[0])
                continue
        strings.append(text)
    return ids, strings


# ---------------------------------------------------------------------- stops + detokenization
class StopMatcher:
    """Per-request incremental detokenization and stop detection, safe for streaming.

    `push(token)` returns the text that is now safe to emit and sets `stopped` at a stop. Text is
    decoded over a short window of recent tokens (never the whole sequence), emitted only once a
    character is complete (no trailing U+FFFD), and held back while its end could be the start of
    a stop string. A stop token id ends the request without being decoded; so does a stop string that
    is one special token (see `split_special_stops`).
    """

    def __init__(self, tokenizer, stop_strings: Sequence[str] = (), stop_token_ids: Sequence[int] = ()) -> None:
        self.tokenizer = tokenizer
        special_ids, stop_strings = split_special_stops(tokenizer, stop_strings)  # e.g. a client's "<|im_end|>"
        self.stop_strings = [s for s in stop_strings if s]
        self.stop_ids = frozenset(int(i) for i in [*stop_token_ids, *special_ids])
        self.stopped = False
        self._ids: list[int] = []
        self._prefix = self._read = 0  # decode window start; end of the already-decoded tokens
        self._pending = ""  # decoded text not emitted yet (it could begin a stop string)

    def push(self, token: int) -> str:
        if token in self.stop_ids:
            self.stopped = True
            return self.flush()
        if self.tokenizer is None:
            return ""
        self._ids.append(token)
        before = self.tokenizer.decode(self._ids[self._prefix:self._read])
        after = self.tokenizer.decode(self._ids[self._prefix:])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self._pending += after[len(before):]
            self._prefix, self._read = self._read, len(self._ids)
        return self._release()

    def flush(self) -> str:
        """The rest of the text once the request ends (an incomplete character decodes as it can)."""
        if self.tokenizer is not None and self._read < len(self._ids):
            before = self.tokenizer.decode(self._ids[self._prefix:self._read])
            after = self.tokenizer.decode(self._ids[self._prefix:])
            self._pending += after[len(before):]
            self._read = len(self._ids)
            text = self._release()  # a stop string may still complete in the last characters
            if self.stopped:
                return text
            text, self._pending = text + self._pending, ""
            return text
        text, self._pending = self._pending, ""
        return text

    def _release(self) -> str:
        pending = self._pending
        if not self.stop_strings:
            self._pending = ""
            return pending
        found = [i for i in (pending.find(s) for s in self.stop_strings) if i >= 0]
        if found:
            self.stopped = True
            self._pending = ""
            return pending[: min(found)]
        hold = 0  # the longest end of `pending` that is the start of a stop string
        for s in self.stop_strings:
            for n in range(min(len(s) - 1, len(pending)), hold, -1):
                if pending.endswith(s[:n]):
                    hold = n
                    break
        self._pending = pending[len(pending) - hold:]
        return pending[: len(pending) - hold]


# ---------------------------------------------------------------------- threads
def threads_for(n: Optional[int]):
    """Run a block with `n` torch threads (None: unchanged), restoring the setting afterwards."""
    return temporarily(torch.get_num_threads, torch.set_num_threads, n)


# ---------------------------------------------------------------------- the engine
PREFILL_CHUNK = 512  # prompt tokens one step prefills, by default (`Engine(prefill_chunk=...)`, `serve --prefill_chunk`)


@dataclass
class _Row:
    """A request in a KV-cache row."""

    request_id: int
    request: Request
    matcher: StopMatcher
    generator: Optional[torch.Generator]
    pos: int  # position of the newest token (sampled, not yet written to the cache); set once prefilled
    generated: int = 0
    prefilled: int = 0  # prompt tokens written to the cache so far
    prompt_logprobs: Optional[list[Optional[TokenLogprob]]] = None  # filled chunk by chunk when asked
    # prefill sharing (`add_many`): rows waiting for this one's prompt KV, and its last prompt logits once in
    followers: list[tuple[int, "_Row"]] = field(default_factory=list)
    last_logits: Optional[torch.Tensor] = None
    constraint: Optional[object] = None  # the row's GrammarState, when its request has a grammar

    @property
    def decoding(self) -> bool:
        return self.prefilled == len(self.request.prompt_ids)


class Engine:
    """Continuous-batching decoder over `max_batch_size` KV-cache rows of `max_seq_length` positions.

    The engine sets the model's KV cache for its lifetime; `close()` (or leaving a `with` block)
    removes it, so plain `model(idx)` calls work again. `add()` and `abort()` may be called from
    another thread than `step()`; `step()` runs in one thread. `prefill_chunk`: the most prompt tokens
    one `step()` prefills (a bound on how long the running rows wait for new prompts).
    """

    def __new__(cls, model=None, *args, **kwargs):
        # a tensor-parallel model (`litllm.parallel`) decodes in its own Engine subclass, which drives the other ranks
        sharded = getattr(model, "engine_class", None)
        return super().__new__(sharded if sharded is not None and cls is Engine else cls)

    def __init__(
        self,
        model,
        tokenizer,
        max_batch_size: int = 1,
        max_seq_length: Optional[int] = None,
        *,
        threads: Optional[int] = None,
        compile: bool = False,
        prefill_chunk: int = PREFILL_CHUNK,
        prefix_caching: bool = False,
        row_steps: bool = False,
    ) -> None:
        if max_batch_size < 1:
            raise LitLLMError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if prefill_chunk < 1:
            raise LitLLMError(f"prefill_chunk must be >= 1, got {prefill_chunk}")
        self.prefill_chunk = prefill_chunk
        self.max_seq_length = max_seq_length or model.max_seq_length
        if self.max_seq_length > model.max_seq_length:
            raise LitLLMError(
                f"max_seq_length {self.max_seq_length} exceeds the model's context window of {model.max_seq_length}"
            )
        self.model = model
        self.tokenizer = tokenizer
        self.max_batch_size = max_batch_size
        self.threads = threads  # CPU threads for step() (None: torch's setting)
        self.vocab_size = model.config.vocab_size  # padded rows of the head are not tokens
        self.device = model.wte.weight.device
        model.set_kv_cache(max_batch_size, self.max_seq_length)
        self._caches = [block.attn.kv_cache for block in model.blocks]  # this engine's; step() puts them back
        # on the model when another engine of the same model has set its own meanwhile
        self._slot_caches = [[c.rows(i, i + 1) for c in self._caches] for i in range(max_batch_size)]
        # decode inputs, one row per slot; a free slot decodes a dummy token at position 0, a slot
        # being prefilled one at its next prompt position (either garbage key is overwritten by that
        # slot's next prefill chunk before anything reads it)
        self._tokens = torch.zeros(max_batch_size, 1, dtype=torch.long, device=self.device)
        # prefix caching: the prompt tokens whose KV each slot holds (kept after its request leaves, until the slot
        # is taken); a free slot's dummy decode then writes at the last position, which no held prefix reaches
        self.prefix_caching = prefix_caching
        self._held: list[list[int]] = [[] for _ in range(max_batch_size)]
        self._park = self.max_seq_length - 1 if prefix_caching else 0
        self.prefix_hits = self.prefix_queries = 0  # prompt tokens reused / prompt tokens admitted (hit rate)
        self._pos = torch.full((max_batch_size, 1), self._park, dtype=torch.long, device=self.device)
        self._active = torch.zeros(max_batch_size, 1, dtype=torch.long, device=self.device)  # 1 = running
        self._rows: list[Optional[_Row]] = [None] * max_batch_size
        self._prefilling: deque[int] = deque()  # slots whose prompt is not all in the cache, in admission order
        self._compiled = compile
        self._decode = self._decode_logits
        self.row_steps = row_steps
        self._row_steps: dict[int, Callable] = {}  # rows -> the compiled step over the first `rows` rows, ascending
        self.decode_steps: dict[int, int] = {}  # rows decoded -> decode steps run over that many (serve's /metrics)
        self.on_close: list[Callable[[], None]] = []  # run once by close() (e.g. recording its eager decode seconds)
        if compile:  # at static shapes, saved/cached on disk; a CUDA graph on CUDA (litllm.compile_decode)
            from litllm.compile_decode import compile_engine_step

            # CUDA: as step() runs it; the CPU: at torch's thread budget, whose kernels take the count step() sets
            # when they run (`litllm.compile_decode.cpu_compile_options`)
            with threads_for(self.threads if self.device.type != "cpu" else None):
                self._decode = compile_engine_step(self)
            self.compile_row_steps()
        self._lock = threading.Lock()
        self._waiting: deque[tuple[int, Request]] = deque()
        self._leader_of: dict[int, int] = {}  # a request -> the one of the same add_many whose prefill it copies
        self._leaders: set[int] = set()
        self._aborts: set[int] = set()
        self._failed: dict[int, Exception] = {}  # requests that failed during this step (see RequestError)
        self._next_id = 0

    # ------------------------------------------------------------------ public interface
    def add(self, request: Request) -> int:
        """Queue a request; returns its id. It joins a free row at the next `step()`."""
        return self.add_many([request])[0]

    def add_many(self, requests: Sequence[Request]) -> list[int]:
        """Queue requests, all or none (each is checked first); returns their ids. Requests with the same prompt
        (the n samples of one prompt) share its prefill: the first one's KV rows are copied into the others'
        (see `_share_prefill`); each then samples with its own generator."""
        for request in requests:
            self._check(request)
        with self._lock:
            ids = list(range(self._next_id, self._next_id + len(requests)))
            self._next_id += len(requests)
            first: dict[tuple, int] = {}
            for request_id, request in zip(ids, requests):
                leader = first.setdefault((tuple(request.prompt_ids), request.prompt_logprobs), request_id)
                if leader != request_id:
                    self._leader_of[request_id] = leader
                    self._leaders.add(leader)
            self._waiting.extend(zip(ids, requests))
        return ids

    def _check(self, request: Request) -> None:
        """Raise LitLLMError (SamplingError for a sampling field) for a request the engine can't run."""
        n = len(request.prompt_ids)
        if n == 0:
            raise LitLLMError("the prompt is empty (no tokens)")
        s = request.sampling
        scoring_only = request.max_new_tokens == 0 and request.prompt_logprobs is not None
        check_sampling_args(s.temperature, s.top_k, s.top_p, None if scoring_only else request.max_new_tokens, s.seed)
        for k in (request.logprobs, request.prompt_logprobs):
            if k is not None and not 0 <= k <= self.vocab_size:
                raise LitLLMError(f"logprobs must be in [0, {self.vocab_size}] (the vocabulary), got {k}")
        for text in request.stop_strings:
            check_text(text, "a stop string")
        embeddings = self.model.config.padded_vocab_size
        bad = next((t for t in request.prompt_ids if not 0 <= t < embeddings), None)
        if bad is not None:
            raise LitLLMError(f"the prompt holds token id {bad}, outside the vocabulary (0..{embeddings - 1})")
        if n + request.max_new_tokens > self.max_seq_length:
            raise LitLLMError(
                f"the prompt has {n} tokens and max_new_tokens is {request.max_new_tokens}: together they exceed "
                f"the context window of {self.max_seq_length} tokens; shorten the prompt or lower max_new_tokens"
            )

    def abort(self, request_id: int) -> None:
        """Stop a request; its row is freed at the next `step()`, which reports finish_reason "abort"."""
        with self._lock:
            self._aborts.add(request_id)

    @property
    def num_running(self) -> int:
        return sum(r is not None for r in self._rows)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def kv_cache_usage(self) -> float:
        """The fraction of the KV cache's positions (rows x max_seq_length) that requests hold now."""
        held = sum(row.pos if row.decoding else row.prefilled for row in list(self._rows) if row is not None)
        return held / (self.max_batch_size * self.max_seq_length)

    @property
    def step_rows(self) -> list[int]:
        """The row counts a decode step runs over (`decode_steps`' keys): the kept row steps' (`compile_row_steps`),
        ascending, and all the rows."""
        return [*self._row_steps, self.max_batch_size]

    @property
    def has_unfinished(self) -> bool:
        return bool(self._waiting) or self.num_running > 0 or bool(self._aborts)

    def close(self) -> None:
        """Remove this engine's KV cache from the model, so plain `model(idx)` calls work again."""
        if self.model.blocks[0].attn.kv_cache is self._caches[0]:
            self.model.clear_kv_cache()
        hooks, self.on_close = self.on_close, []
        for hook in hooks:
            hook()

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @torch.inference_mode()
    def step(self) -> list[Output]:
        """Admit waiting requests into free rows, prefill up to `prefill_chunk` of their prompt tokens,
        then one decode step for every row whose prompt is in, where some row was decoding when the step began
        (else the step ends with the first tokens its prefill sampled).

        What fails for one request only (admitting it, its prefill, sampling or detokenizing its token)
        drops that request and raises `RequestError` once the step is done, holding the others' Outputs;
        a failure of the batched decode forward raises as is (every running row is concerned)."""
        outputs: list[Output] = []
        self._failed = {}
        if self.model.blocks[0].attn.kv_cache is not self._caches[0]:
            self._set_caches(self._caches)
        with threads_for(self.threads):
            self._handle_aborts(outputs)
            # a step that brings the first rows in returns their first tokens at once (no running row waits on it)
            # and the next one decodes them: a request that finds the engine idle has its first token out at its
            # prefill's end, not a decode step later (issue #27); rows joining running ones decode with them
            was_decoding = any(row is not None and row.decoding for row in self._rows)
            self._admit(outputs)
            self._prefill(outputs)
            running = [(slot, row) for slot, row in enumerate(self._rows) if row is not None and row.decoding]
            if running and was_decoding:
                kv_len = max(row.pos for _, row in running) + 1  # (a static torch.compile'd step: ignored)
                logits = self._decode_running(running, kv_len)  # (R, vocab), R <= B: the slots up to the last running
                tokens = self._pick(logits, running)
                logprobs = self._decode_logprobs(logits, running)
                for slot, row in running:
                    if self._rows[slot] is not row:  # its sampling failed
                        continue
                    row.pos += 1
                    try:
                        self._advance(slot, row, tokens[slot], outputs, logprobs.get(slot))
                    except Exception as e:
                        self._fail(slot, row, e)
                self._pos.add_(self._active)  # the rows still running move one position on
        outputs = _merge(outputs)
        if self._failed:
            failed, self._failed = self._failed, {}
            raise RequestError(failed, [out for out in outputs if out.request_id not in failed])
        return outputs

    def compile_row_steps(self) -> None:
        """With `row_steps` (serve's engine) and a compiled CPU step (AOTInductor's: compiled, or a saved one loaded),
        steps over the first 1, 2, 4, ... rows too, loaded or compiled and saved as the step is, which a step whose
        running rows all lie there takes (slots are taken lowest first): one client of a 16-slot server decodes one
        row, not 16. Only those timed faster here than every larger step are kept (`faster_row_steps`): a compiled
        step's cost grows with its rows, but not evenly (the 134M bf16 model on the AMX Xeon, 1 thread: 1 row 21 CPU-ms,
        4 rows 54, 8 rows 88, all 16 72)."""
        from litllm.compile_decode import compile_engine_step, faster_row_steps

        if not self.row_steps or getattr(self, "step_source", None) not in ("loaded", "compiled"):
            return  # (torch.compile's step, or eager)
        rows, steps = 1, {}
        while rows < self.max_batch_size and (step := compile_engine_step(self, rows)) is not None:
            steps[rows] = step
            rows *= 2
        if steps:
            self._row_steps = faster_row_steps(self, steps)

    # ------------------------------------------------------------------ internals
    def _decode_logits(self, tokens: torch.Tensor, pos: torch.Tensor, kv_len: Optional[int]) -> torch.Tensor:
        return self.model.decode(tokens, input_pos=pos, kv_len=kv_len)[:, -1, : self.vocab_size]

    def _decode_running(self, running: list[tuple[int, _Row]], kv_len: Optional[int]) -> torch.Tensor:
        """Logits of the first R slots, R the fewest rows of a step (`row_steps`, else all B) that hold every running
        slot (`running`: ascending slots); slots beyond R (free, or prefilling) are not decoded."""
        last = running[-1][0] + 1
        rows = next((n for n in self._row_steps if n >= last), self.max_batch_size)
        self.decode_steps[rows] = self.decode_steps.get(rows, 0) + 1
        if rows == self.max_batch_size:
            return self._decode(self._tokens, self._pos, kv_len)  # (B, vocab)
        return self._row_steps[rows](self._tokens[:rows], self._pos[:rows], kv_len)  # (rows, vocab)

    def _admit(self, outputs: list[Output]) -> None:
        """Move waiting requests into free rows (their prompts are prefilled from the next `_prefill`, or copied
        from the row of the same prompt, see `add_many`)."""
        for slot in range(self.max_batch_size):
            if self._rows[slot] is not None or not self._waiting:
                continue
            with self._lock:
                request_id, request = self._waiting.popleft()
                leader_id = self._leader_of.pop(request_id, None)
            s = request.sampling
            generator = None
            try:
                if s.seed is not None and s.temperature > 0:
                    generator = torch.Generator(device=self.device).manual_seed(s.seed)
                matcher = StopMatcher(self.tokenizer, request.stop_strings, request.stop_token_ids)
                constraint = None if request.grammar is None else request.grammar.start(request.stop_token_ids)
            except Exception as e:
                self._failed[request_id] = e
                continue
            reused = 0
            if self.prefix_caching:
                slot, reused = self._reuse_prefix(slot, request, leader_id is None)
            row = self._rows[slot] = _Row(request_id, request, matcher, generator, pos=len(request.prompt_ids),
                                          constraint=constraint, prefilled=reused)
            leader = self._row_of(leader_id)
            if leader is None:  # none, or it has left: its own prefill
                self._prefilling.append(slot)
            elif leader[1].decoding:
                self._share_prefill(leader, slot, row, outputs)
            else:
                leader[1].followers.append((slot, row))

    def _reuse_prefix(self, slot: int, request: Request, own_prefill: bool) -> tuple[int, int]:
        """The slot a request takes (free `slot`, or a free one that holds more of its prompt) and how many of its
        prompt tokens' KV is there already: the longest prefix any slot holds, copied over when that slot is not
        free. At least the last prompt token is prefilled (its logits start decoding); none with prompt_logprobs."""
        prompt = request.prompt_ids
        self.prefix_queries += len(prompt)
        n, source = 0, None
        if own_prefill and request.prompt_logprobs is None:
            for s, held in enumerate(self._held):
                common = _common_prefix(held, prompt, len(prompt) - 1)
                if common > n:
                    n, source = common, s
        free = [s for s, row in enumerate(self._rows) if row is None]
        if source in free:
            slot = source
        else:  # the free slot whose held prefix is shortest is evicted
            slot = min(free, key=lambda s: len(self._held[s]))
            self._copy_kv(source, slot, n)
        self._held[slot] = prompt[:n]
        self._pos[slot] = n  # (a dummy decode before its first chunk writes where that chunk will)
        self.prefix_hits += n
        return slot, n

    def _copy_kv(self, source: int, slot: int, n: int) -> None:
        """Copy the KV of the first n positions of slot `source` into slot `slot`."""
        for cache in self._caches if n else ():
            cache.k[slot, :, :n] = cache.k[source, :, :n]  # (nkv, n, hs)
            cache.v[slot, :, :n] = cache.v[source, :, :n]

    def _row_of(self, request_id: Optional[int]) -> Optional[tuple[int, _Row]]:
        return next(((slot, row) for slot, row in enumerate(self._rows) if row is not None and
                     row.request_id == request_id), None)

    def _share_prefill(self, leader: tuple[int, _Row], slot: int, row: _Row, outputs: list[Output]) -> None:
        """Give the row in `slot` the prompt KV of the leader's (same prompt) and sample its first token from
        the leader's last prompt logits: its prefill, without computing it again."""
        n = len(row.request.prompt_ids)
        self._copy_kv(leader[0], slot, n)
        row.prefilled, row.prompt_logprobs = n, leader[1].prompt_logprobs
        self._held[slot] = row.request.prompt_ids[: self._park]  # (none without prefix caching: park 0)
        try:
            self._start_decoding(slot, row, leader[1].last_logits, outputs)
        except Exception as e:
            self._fail(slot, row, e)

    def _prefill(self, outputs: list[Output]) -> None:
        """Write up to `prefill_chunk` prompt tokens to the cache, first admitted first; a row whose
        prompt is then all in samples its first token (and decodes with the others in this step)."""
        budget = self.prefill_chunk
        while self._prefilling and budget > 0:
            slot = self._prefilling[0]
            row = self._rows[slot]
            start, stop = row.prefilled, min(len(row.request.prompt_ids), row.prefilled + budget)
            budget -= stop - start
            try:
                self._prefill_chunk(slot, row, start, stop, outputs)
            except Exception as e:
                self._fail(slot, row, e)

    def _prefill_chunk(self, slot: int, row: _Row, start: int, stop: int, outputs: list[Output]) -> None:
        """Write prompt tokens start..stop of the row in `slot`; sample its first token after the last chunk."""
        ids = torch.tensor(row.request.prompt_ids[start:stop], dtype=torch.long, device=self.device)
        scored = row.request.prompt_logprobs is not None
        self._set_caches(self._slot_caches[slot])  # write this slot's cache row only: views of it
        try:
            logits = self._prefill_logits(ids, start, stop, scored)
        finally:
            self._set_caches(self._caches)
        if scored:
            self._score_prompt(row, logits, start, stop)
        logits = logits[-1:]
        row.prefilled = stop
        self._held[slot] = row.request.prompt_ids[: min(stop, self._park)]
        if not row.decoding:
            self._pos[slot] = stop  # this slot's dummy decode writes where the next chunk will
            return
        self._prefilling.popleft()
        if row.request_id in self._leaders:  # kept for the rows that share this prefill
            row.last_logits = logits.clone()
        for follower_slot, follower in row.followers:
            if self._rows[follower_slot] is follower:
                self._share_prefill((slot, row), follower_slot, follower, outputs)
        row.followers = []
        self._start_decoding(slot, row, logits, outputs)

    def _prefill_logits(self, ids: torch.Tensor, start: int, stop: int, scored: bool) -> torch.Tensor:
        """Prefill prompt tokens start..stop (`ids`, (T,)) into the cache set: their logits (T, vocab) if `scored`,
        else the last one's (1, vocab). Within `step_rounding`: with int8 CPU layers the prompt's KV and the first
        generated token's logits come from the compiled step's rounding, as every later token's do, not from the
        eager kernels' coarser one (fbgemm's 7-bit rows flip near-ties: issue #27)."""
        with step_rounding():
            return self.model.decode(ids[None], input_pos=torch.arange(start, stop, device=self.device), kv_len=stop,
                                     logits_to_keep=None if scored else 1)[0, :, : self.vocab_size]  # (T, vocab)

    def _start_decoding(self, slot: int, row: _Row, logits: torch.Tensor, outputs: list[Output]) -> None:
        """The row's prompt is in: sample its first token from the last prompt logits (1, vocab)."""
        if row.request.max_new_tokens == 0:  # scoring only (prompt_logprobs)
            outputs.append(Output(row.request_id, "", [], True, "length", len(row.request.prompt_ids), 0,
                                  prompt_logprobs=row.prompt_logprobs))
            self._free(slot)
            return
        masked = logits
        if row.constraint is not None:
            masked = logits.clone()
            row.constraint.mask_(masked)
        token = self._sample(masked, row)
        self._tokens[slot] = token
        self._pos[slot] = row.pos
        self._active[slot] = 1
        logprob = None
        if row.request.logprobs is not None:
            logprob = token_logprobs(logits, torch.tensor([token], device=self.device), row.request.logprobs)[0]
        self._advance(slot, row, token, outputs, logprob)

    def _fail(self, slot: int, row: _Row, error: Exception) -> None:
        """Drop the request in `slot` after `error` (step() raises RequestError for it once done)."""
        self._failed[row.request_id] = error
        if self._rows[slot] is row:
            self._free(slot)

    def _set_caches(self, caches) -> None:
        for block, cache in zip(self.model.blocks, caches):
            block.attn.kv_cache = cache

    def _sample(self, logits: torch.Tensor, row: _Row) -> int:
        s = row.request.sampling
        return int(sample(logits, s.temperature, s.top_k, s.top_p, row.generator)[0])

    def _pick(self, logits: torch.Tensor, running: list[tuple[int, _Row]]) -> list[int]:
        """Next token of every slot (B,): one argmax for all rows, then the sampling rows: the distribution of all the
        rows of one sampling setting at once (those rows only), each row drawn with its own generator, on the device;
        one read back to the host for all of them. Rows with a grammar pick from their masked logits."""
        logits = self._masked(logits, running)
        picked = greedy(logits)  # (B,)
        settings: dict[tuple, list[tuple[int, _Row]]] = {}  # the sampling rows of each (temperature, top_k, top_p)
        for slot, row in running:
            s = row.request.sampling
            if s.temperature > 0:
                settings.setdefault((s.temperature, s.top_k, s.top_p), []).append((slot, row))
        for setting, rows in settings.items():
            try:
                probs = sampling_probs(logits[[slot for slot, _ in rows]], *setting)  # (len(rows), vocab)
            except Exception as e:
                for slot, row in rows:
                    self._fail(slot, row, e)
                continue
            for i, (slot, row) in enumerate(rows):
                try:
                    picked[slot] = torch.multinomial(probs[i: i + 1], 1, generator=row.generator)[0, 0]
                except Exception as e:
                    self._fail(slot, row, e)
        self._tokens[: len(picked)].copy_(picked[:, None])
        return picked.tolist()

    def _masked(self, logits: torch.Tensor, running: list[tuple[int, _Row]]) -> torch.Tensor:
        """`logits` (B, vocab) with each constrained row's forbidden tokens at -inf: a copy (the mask is filled on the
        host, per row); the same tensor, and no work nor device sync, when no running row has a grammar."""
        constrained = [(slot, row) for slot, row in running if row.constraint is not None]
        if not constrained:
            return logits
        logits = logits.clone()
        for slot, row in constrained:
            try:
                row.constraint.mask_(logits[slot: slot + 1])
            except Exception as e:
                self._fail(slot, row, e)
        return logits

    def _score_prompt(self, row: _Row, logits: torch.Tensor, start: int, stop: int) -> None:
        """Append the logprobs of prompt tokens start+1..stop (those `logits` (stop - start, vocab) predict)."""
        prompt = row.request.prompt_ids
        targets = prompt[start + 1: stop + 1]  # the token after each position, within the prompt
        if row.prompt_logprobs is None:
            row.prompt_logprobs = [None]  # the first token has nothing before it
        if targets:
            ids = torch.tensor(targets, dtype=torch.long, device=self.device)
            row.prompt_logprobs += token_logprobs(logits[: len(targets)], ids, row.request.prompt_logprobs)

    def _decode_logprobs(self, logits: torch.Tensor, running: list[tuple[int, _Row]]) -> dict[int, TokenLogprob]:
        """{slot: TokenLogprob} of this step's token for the rows that asked; nothing is computed (nor read
        back from the device) when no row asked."""
        asking = [(slot, row.request.logprobs) for slot, row in running
                  if row.request.logprobs is not None and self._rows[slot] is row]
        if not asking:
            return {}
        slots = torch.tensor([slot for slot, _ in asking], device=self.device)
        scored = token_logprobs(logits[slots], self._tokens[slots, 0], max(k for _, k in asking))
        return {slot: TokenLogprob(lp.token_id, lp.logprob, lp.top[:k]) for (slot, k), lp in zip(asking, scored)}

    def _advance(self, slot: int, row: _Row, token: int, outputs: list[Output],
                 logprob: Optional[TokenLogprob] = None) -> None:
        """Record `token` (and its logprob, when asked) for the row; free the row when it finished."""
        row.generated += 1
        if row.constraint is not None:
            row.constraint.accept(token)
        text = row.matcher.push(token)
        reason = None
        if row.matcher.stopped or (row.constraint is not None and row.constraint.done):
            reason = "stop"
        elif row.generated >= row.request.max_new_tokens:
            reason = "length"
            text += row.matcher.flush()
        outputs.append(Output(row.request_id, text, [token], reason is not None, reason,
                              len(row.request.prompt_ids), row.generated,
                              logprobs=None if logprob is None else [logprob],
                              prompt_logprobs=row.prompt_logprobs if row.generated == 1 else None))
        if reason is not None:
            self._free(slot)

    def _free(self, slot: int) -> None:
        row = self._rows[slot]
        if row is not None:
            self._leaders.discard(row.request_id)
            live = [(slot_, f) for slot_, f in row.followers if self._rows[slot_] is f]
            if live:  # it left before its prompt was in: the first follower prefills it, for the others too
                (new_slot, new_leader), new_leader.followers = live[0], live[1:]
                self._leaders.add(new_leader.request_id)
                self._prefilling.append(new_slot)
        self._rows[slot] = None
        if slot in self._prefilling:
            self._prefilling.remove(slot)
        self._pos[slot] = self._park
        self._active[slot] = 0

    def _handle_aborts(self, outputs: list[Output]) -> None:
        if not self._aborts:
            return
        with self._lock:
            aborts, self._aborts = self._aborts, set()
            kept = deque()
            for request_id, request in self._waiting:
                if request_id in aborts:
                    self._leader_of.pop(request_id, None)
                    self._leaders.discard(request_id)
                    outputs.append(Output(request_id, "", [], True, "abort", len(request.prompt_ids), 0))
                else:
                    kept.append((request_id, request))
            self._waiting = kept
        for slot, row in enumerate(self._rows):
            if row is not None and row.request_id in aborts:
                outputs.append(Output(row.request_id, "", [], True, "abort", len(row.request.prompt_ids),
                                      row.generated))
                self._free(slot)


def _common_prefix(a: Sequence[int], b: Sequence[int], limit: int) -> int:
    """The length of the common prefix of a and b, at most `limit`."""
    n = 0
    for x, y in zip(a, b):
        if x != y or n >= limit:
            break
        n += 1
    return n


def _merge(outputs: list[Output]) -> list[Output]:
    """One Output per request (a request prefilled in this step also decoded in it)."""
    merged: dict[int, Output] = {}
    for out in outputs:
        prev = merged.get(out.request_id)
        if prev is None:
            merged[out.request_id] = out
        else:
            logprobs = None if prev.logprobs is None and out.logprobs is None else (prev.logprobs or []) + (out.logprobs or [])
            merged[out.request_id] = Output(out.request_id, prev.text + out.text, prev.token_ids + out.token_ids,
                                            out.finished, out.finish_reason, out.prompt_tokens, out.completion_tokens,
                                            logprobs, prev.prompt_logprobs or out.prompt_logprobs)
    return list(merged.values())


def generate_ids(
    model,
    prompt_ids: Sequence[int],
    max_new_tokens: int,
    sampling: Optional[Sampling] = None,
    stop_token_ids: Sequence[int] = (),
    tokenizer=None,
    stop_strings: Sequence[str] = (),
) -> list[int]:
    """The new token ids after one prompt (a stop token id excluded), on a one-row Engine sized to fit."""
    prompt_ids = [int(i) for i in prompt_ids]
    with Engine(model, tokenizer, 1, len(prompt_ids) + max_new_tokens) as engine:
        engine.add(Request(prompt_ids, max_new_tokens, sampling or Sampling(), stop_strings, stop_token_ids))
        tokens: list[int] = []
        while engine.has_unfinished:
            for out in engine.step():
                tokens += out.token_ids
    if tokens and tokens[-1] in set(stop_token_ids):
        tokens.pop()
    return tokens
