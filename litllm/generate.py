"""`litllm generate`: a prompt in, streamed text out, with the flags `generate` and `chat` share
(`DecodeArgs`) and the draft model of speculative decoding.

Loading for decoding is `litllm.inference`; decoding itself (sampling, stops, the KV-cache loop with
continuous batching) is `litllm.engine`.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from litllm import compile_decode
from litllm.compile_decode import compile_cache_dir, pick_compiled_threads, saved_step_length, step_engine
from litllm.compile_ledger import (PROBE_STEPS, compile_choice, eager_account, env_compile, expected_tokens_per_round,
                                   note_compile, record_decode_choices, record_step_compile, record_tokens_per_round,
                                   time_decode)
from litllm.engine import SEED_LIMIT, Engine, Request, Sampling, check_sampling_args
from litllm.errors import LitLLMError
from litllm.flags import with_flags
from litllm.inference import LoadArgs, load_decoder, load_for_decoding


def decode_engine(model, tokenizer, rows: int, max_seq_length: int, threads: Optional[int],
                  compile: Optional[bool] = None, tokens: Optional[int] = None, *, exact_length: bool = False,
                  **engine_args) -> Engine:
    """An `Engine` whose decode step is compiled as `compile` says (None: `litllm.compile_ledger.compile_choice`,
    for `tokens` decoded tokens, None: long-lived; a saved compiled step that fits is loaded, `step_engine`, which
    also says the KV-cache length of a compiled step; on the CPU, a run of `tokens` tokens compiles where the eager
    decode seconds it and earlier such runs spend reach the expected compile seconds, `EagerAccount`, else it
    decodes eagerly and its seconds are recorded when it closes; its first run of a model and shape times
    `PROBE_STEPS` eager steps first). Compiled, the step compiles (or loads) now, with a 2-token warm-up; what a
    compile took is recorded, and the engine takes the thread count timed on its compiled step (`compiled_threads`),
    recorded with the loader's weight layout, so that the next load of the model picks the same and finds its
    saved step (`litllm.compile_ledger.record_decode_choices`)."""
    if compile is None and hasattr(model, "block_devices"):  # --strategy sequential: eager unless asked
        return Engine(model, tokenizer, rows, max_seq_length, threads=threads, **engine_args)

    def make(rows: int, length: int, compiled: bool) -> Engine:
        picked = loader_threads(model, threads) if compiled else None  # the compiled step's pick, once made
        return Engine(model, tokenizer, rows, length, threads=threads if picked is None else picked,
                      compile=compiled, **engine_args)

    account = None  # default CPU runs with no saved step: rent (decode eagerly) or buy (compile), in seconds
    if compile is None and env_compile() is None and tokens is not None:
        account = eager_account(model, rows, max_seq_length, exact_length)
    choice = compile_choice(compile, model.wte.weight.device, tokens) if account is None else None
    if account is not None:
        engine = make(rows, max_seq_length, False)
        tally = time_decode(engine)
        if account.step_seconds is None:  # never timed here: a few eager steps say what one costs
            engine.add(Request([0], PROBE_STEPS + 1))  # its first token is the prefill's
            while engine.has_unfinished:
                engine.step()
            account.step_seconds = tally.seconds / max(tally.steps, 1)
        if not account.pays(tokens):
            engine.on_close.append(lambda: account.add(tally.seconds, tally.steps))
            return engine
        engine.close()
        choice = True
    if (choice and account is None and model.wte.weight.device.type == "cpu" and getattr(model, "tp_size", 1) == 1
            and saved_step_length(model, rows, max_seq_length, exact=exact_length) is None):
        note_compile(model)  # nothing saved to load: this compiles now, a minute where eager runs start in seconds
    engine = step_engine(make, model, rows, max_seq_length, choice, exact=exact_length)
    if not choice:
        compiled_threads(engine, threads)  # a loaded saved step
        return engine
    t0 = compile_decode.clock()
    engine.add(Request([0], 2))  # its second token runs the decode step: compiled, or loaded from the cache
    while engine.has_unfinished:
        engine.step()
    engine.compile_seconds += compile_decode.clock() - t0
    record_step_compile(model, engine)  # the price of its next compile, and of other models' first (scaled)
    if account is not None:
        account.settle(saved=engine.step_source != "torch.compile")
    compiled_threads(engine, threads)
    return engine


def compiled_threads(engine, threads: Optional[int]) -> None:
    """A compiled CPU step given the loader's thread count (`threads`, as `load_for_decoding` picked it,
    `model.decode_choices`) decodes with the count timed on the compiled step instead
    (`litllm.compile_decode.pick_compiled_threads`, once per model: later engines of it take that pick), and the
    loader's layout and that count are recorded, so that the next load of the model here picks the same (the same
    kernels, the saved step) without timing. A count the caller chose itself is left alone."""
    model = engine.model
    if not engine._compiled or model.wte.weight.device.type != "cpu" or loader_threads(model, threads) is None:
        return
    choices = model.decode_choices
    if choices["threads_by"] == "eager":  # picked on the eager step: time the compiled one
        choices.update(eager_threads=threads, threads=pick_compiled_threads(engine), threads_by="compiled")
    engine.threads = choices["threads"]
    record_decode_choices(choices["key"], choices["layout"], choices["threads"])


def loader_threads(model, threads: Optional[int]) -> Optional[int]:
    """The thread count `model` decodes with (`model.decode_choices["threads"]`: the loader's pick, or the compiled
    step's once `compiled_threads` made it) when `threads` is the count the loader gave (`load_for_decoding`: that
    pick, or the eager pick it replaced, "eager_threads"); None for a count the caller chose itself, or a model the
    loader did not pick for."""
    choices = getattr(model, "decode_choices", None)
    if choices is None or threads not in (choices["threads"], choices.get("eager_threads")):
        return None
    return choices["threads"]


@dataclass
class DecodeArgs:
    """The flags `generate` and `chat` share: the prompt format, sampling, and compiling the decode step."""

    sys_prompt: Optional[str] = None
    """A system prompt, for styles that have one (`chat` keeps it at the start of the conversation)."""
    prompt_style: Optional[str] = None
    """A prompt style name (e.g. `alpaca`, `llama3`, `chatml`, `default` for plain text); by default the checkpoint's `prompt_style.yaml`, its chat template, or its family's style."""
    temperature: float = 0.8
    """Sampling temperature; 0 means greedy decoding."""
    top_k: Optional[int] = 50
    """Sample only among the k most likely tokens (null: no limit)."""
    top_p: float = 1.0
    """Nucleus sampling: sample among the most likely tokens whose probabilities add up to top_p, in (0, 1]; 1 disables it."""
    compile: Optional[bool] = None
    """Compile the decode step, saved in ~/.cache/litllm/torch_compile: true: now; false: never, nor load a saved one; default: when it pays: a chat, at least 128 new tokens on CUDA, or, on the CPU, the run whose expected eager decode seconds, with those earlier runs of this model and shape spent, reach what a compile is expected to take (a one-line note; it compiles once); a run that a saved compiled step fits loads it (ms); or as $LITLLM_COMPILE says."""
    seed: int = 1234
    """Random seed for sampling."""
    draft_model: Optional[Path] = None
    """Speculative decoding: a small converted model folder with the same tokenizer that proposes tokens for the model to check (same output, greedy or sampled; faster when the draft often agrees)."""
    num_speculative_tokens: int = 4
    """Tokens the draft model proposes per step (with --draft_model)."""

    def check_draft(self, load: "LoadArgs") -> None:
        """`--draft_model`'s flags, before the model loads (`check_draft_flags`; tensor parallelism: `load`'s)."""
        if self.draft_model is not None:
            self.draft_model = check_draft_flags(self.draft_model, self.num_speculative_tokens, load.tensor_parallel)

    def sampling(self, i: int = 0) -> Sampling:
        """The sampling of the i-th answer (seed + i: each sample or turn replays the same way)."""
        return Sampling(self.temperature, self.top_k, self.top_p, (self.seed + i) % SEED_LIMIT)

    def engine(self, model, tokenizer, max_seq_length: int, threads: Optional[int], load: "LoadArgs",
               tokens: Optional[int] = None):
        """The one-row decode engine of `generate` and `chat`: an `Engine`, or with `--draft_model` a
        `litllm.speculative.SpeculativeEngine` (the draft loads on the model's device, in `--precision`).
        `tokens`: how many it will decode (None: unknown, a chat), for `--compile`'s default."""
        if self.draft_model is None:
            return decode_engine(model, tokenizer, 1, max_seq_length, threads, self.compile, tokens)
        draft = load_draft(model, tokenizer, self.draft_model, load.precision)
        return speculative_engine(model, draft, tokenizer, max_seq_length, threads, self.num_speculative_tokens,
                                  self.compile, tokens)


def speculative_engine(model, draft, tokenizer, max_seq_length: int, threads: Optional[int],
                       num_speculative_tokens: int, compile: Optional[bool] = None, tokens: Optional[int] = None):
    """A one-row `litllm.speculative.SpeculativeEngine` whose steps are compiled as plain decoding's are: the
    draft's one-token decode step is its `decode_engine` (`compile` as there, its saved steps; the rounds run both
    models on `threads`, see `SpeculativeEngine._round`), and the target's check of the proposals, one forward over
    k + 1 tokens (k = `num_speculative_tokens`), is `litllm.compile_decode.verify_engine`'s. `--compile true`,
    `false` or `$LITLLM_COMPILE` decide both; a long-lived engine (`tokens` None: chat) compiles both. A default
    run of `tokens` tokens (the CPU, no saved step) prices each step apart, rent or buy from measured times
    (`EagerAccount`): its rounds are `tokens` over the tokens a round yielded in the last run with this draft (none
    measured: 1 a round, `expected_tokens_per_round`); the draft compiles where its k steps a round, at its measured
    eager step, and earlier runs' eager seconds reach its expected compile, and the verify step where its one eager
    check a round (`probe_verify` times one in the first run) and earlier runs' reach the target's verify compile
    (its last here, else its decode step's); a step that fits a saved one loads it. `compile_seconds`: what building
    the compiled steps took (None: both eager)."""
    from litllm.compile_decode import _verify_kind, verify_engine
    from litllm.speculative import SpeculativeEngine

    k = num_speculative_tokens
    default = compile is None and env_compile() is None and tokens is not None
    rounds = math.ceil(tokens / expected_tokens_per_round(model, draft, k)) if tokens is not None else None
    draft_threads = getattr(draft, "decode_choices", {}).get("threads", threads)  # its loader's pick
    drafting = decode_engine(draft, tokenizer, 1, max_seq_length, draft_threads, compile,
                             None if rounds is None else k * rounds)  # the draft decodes k tokens a round

    def make(length: int) -> Engine:
        return Engine(model, tokenizer, 1, length, threads=threads)

    account = eager_account(model, 1, max_seq_length, kind=_verify_kind(k + 1)) if default else None
    try:
        if account is not None:
            checking = verify_engine(make, model, max_seq_length, k + 1, False)  # eager, for now
            if account.step_seconds is None:  # never timed here: a few eager checks say what one costs
                account.step_seconds = probe_verify(checking, k + 1, threads)
            if account.pays(rounds):
                checking.close()
                checking = verify_engine(make, model, max_seq_length, k + 1, True)
        else:  # as the draft's step is made, where the default has no account (a saved verify step, off the CPU)
            choice = True if drafting._compiled else (False if compile is False or env_compile() is False else None)
            checking = verify_engine(make, model, max_seq_length, k + 1, choice)
    except BaseException:
        drafting.close()
        raise
    record_step_compile(model, checking, _verify_kind(k + 1))  # as the draft's step (decode_engine) records its own
    engine = SpeculativeEngine(model, draft, tokenizer, max_seq_length, num_speculative_tokens=k,
                               threads=threads, draft_engine=drafting, target_engine=checking)
    if account is not None:
        _keep_account(engine, account, checking)
    if default:  # how many tokens its rounds yielded: later runs' rounds
        checking.on_close.append(lambda: engine.rounds and record_tokens_per_round(
            model, draft, k, (engine.accepted + engine.rounds) / engine.rounds))
    seconds = [e.compile_seconds for e in (drafting, checking) if getattr(e, "compile_seconds", None) is not None]
    engine.compile_seconds = sum(seconds) if seconds else None
    engine.step_source = "loaded" if all(getattr(e, "step_source", None) == "loaded" for e in (drafting, checking)) \
        else "compiled"
    return engine


def probe_verify(engine: Engine, width: int, threads: Optional[int]) -> float:
    """The seconds of one eager check of `width` tokens (`litllm.speculative.eager_forward` over all their
    positions; fewer where the cache is shorter) on the target's one-row `engine`, the mean of `PROBE_STEPS` (at the
    cache's first positions, which the next prompt's prefill overwrites before any query reads them)."""
    from litllm.engine import threads_for
    from litllm.speculative import eager_forward

    seconds, ids = 0.0, [0] * min(width, engine.max_seq_length)
    with torch.inference_mode(), threads_for(threads):
        for _ in range(PROBE_STEPS):
            t0 = compile_decode.clock()
            eager_forward(engine, ids, 0, all_logits=True)
            seconds += compile_decode.clock() - t0
    return seconds / PROBE_STEPS


def _keep_account(engine, account, checking: Engine) -> None:
    """A default run's verify step: compiled after `account.pays` asked for it, its rent goes (or, unsaved, is
    marked); eager, its checks are timed and added to the rent when the engine closes."""
    if checking.verify is not None:
        if getattr(checking, "step_source", None) != "loaded":
            account.settle(saved=checking.step_source != "torch.compile")
        return
    tally = time_decode(engine, "_verify")
    checking.on_close.append(lambda: account.add(tally.seconds, tally.steps))


def acceptance_line(accepted: int, proposed: int, num_speculative_tokens: int, what: str = "") -> str:
    """The line `generate` and `chat` print for speculative decoding's acceptance rate: `accepted` of the draft's
    `proposed` tokens (the engine's counts, `SpeculativeEngine.accepted` / `.proposed`); `what` says over what."""
    return (f"Draft acceptance{what}: {accepted / proposed:.0%} ({accepted} of {proposed} proposed tokens, "
            f"{num_speculative_tokens} per step)")


def check_draft_flags(draft_dir: Path, num_speculative_tokens: int, tensor_parallel: bool) -> Path:
    """`--draft_model` and `--num_speculative_tokens`, checked before the model loads (a large one loads for
    minutes): a converted model folder, at least one token, not with tensor parallelism (`tensor_parallel`); returns
    the folder."""
    from litllm.model_folder import check_model_folder

    if tensor_parallel:
        raise LitLLMError("--draft_model with --devices > 1: speculative decoding of a model over several devices is "
                          "not supported yet; drop one of them")
    if num_speculative_tokens < 1:
        raise LitLLMError(f"--num_speculative_tokens must be >= 1, got {num_speculative_tokens}")
    try:
        return check_model_folder(draft_dir)
    except LitLLMError as e:
        raise LitLLMError(f"--draft_model: {e}") from None


def load_draft(model, tokenizer, draft_dir: Path, precision: Optional[str]):
    """The draft model of speculative decoding from its folder (`check_draft_flags` checked it): on `model`'s
    device, in `precision`, for decoding; refused with one line unless it has `tokenizer`'s vocabulary."""
    from litllm.speculative import check_same_vocabulary
    from litllm.tokenizer import Tokenizer

    draft, _ = load_for_decoding(draft_dir, str(model.wte.weight.device), precision)
    check_same_vocabulary(tokenizer, Tokenizer(draft_dir), model, draft, draft_dir)
    return draft


@with_flags("decode", DecodeArgs)
@with_flags("load", LoadArgs)
def generate(
    checkpoint_dir: Path,
    prompt: str = "What food do llamas eat?",
    *,
    num_samples: int = 1,
    max_new_tokens: Optional[int] = None,
    decode: dict,
    load: dict,
) -> None:
    """Generate text from a prompt with a converted model, streaming it to stdout.

    Args:
        checkpoint_dir: A converted model folder (`lit_model.safetensors`, `model_config.yaml`, tokenizer).
        prompt: The instruction or text to continue; formatted with the prompt style first.
        num_samples: How many independent samples to generate (sample i uses seed + i).
        max_new_tokens: Most tokens to generate per sample (stops earlier at EOS or a stop string);
            default 50, reduced to what the context window leaves after the prompt.
    """
    decoding = DecodeArgs(**decode)
    check_sampling_args(decoding.temperature, decoding.top_k, decoding.top_p, max_new_tokens, decoding.seed)
    if num_samples < 1:
        raise LitLLMError(f"--num_samples must be >= 1, got {num_samples}")
    decoding.check_draft(LoadArgs(**load))
    t0 = time.perf_counter()
    loaded = load_decoder(checkpoint_dir, decoding.prompt_style, LoadArgs(**load))
    model, tokenizer = loaded.model, loaded.tokenizer
    print(f"Loaded {loaded.checkpoint_dir} in {time.perf_counter() - t0:.2f} s", file=sys.stderr)
    prompt_ids = loaded.encode(prompt, decoding.sys_prompt)
    max_new_tokens = loaded.max_new_tokens(len(prompt_ids), max_new_tokens, 50)
    stops = loaded.stops()
    with decoding.engine(model, tokenizer, len(prompt_ids) + max_new_tokens, loaded.threads, LoadArgs(**load),
                         num_samples * max_new_tokens) as engine:
        if getattr(engine, "compile_seconds", None) is not None:
            how = "Loaded the saved compiled" if getattr(engine, "step_source", None) == "loaded" else "Compiled the"
            print(f"{how} decode step in {engine.compile_seconds:.2f} s (cache: {compile_cache_dir()})", file=sys.stderr)
        for i in range(num_samples):
            t0 = time.perf_counter()
            engine.add(Request(prompt_ids, max_new_tokens, decoding.sampling(i), **stops))
            n = 0
            while engine.has_unfinished:
                for out in engine.step():
                    print(out.text, end="", flush=True)
                    n = out.completion_tokens
            print(flush=True)
            dt = time.perf_counter() - t0
            print(f"Sample {i + 1}: {n} tokens in {dt:.2f} s, {n / dt:.2f} tokens/s", file=sys.stderr)
        if getattr(engine, "proposed", 0):
            print(acceptance_line(engine.accepted, engine.proposed, decoding.num_speculative_tokens), file=sys.stderr)
    if model.wte.weight.device.type == "cuda":
        print(f"Memory used: {torch.cuda.max_memory_allocated() / 1e9:.2f} GB", file=sys.stderr)
