"""When the decode engine's step is compiled, and the records that decide it (rent or buy): the ledger of eager
decode seconds, compile seconds and speculative rounds (`SECONDS_FILE`), and the layout and thread count a
compiled run picked (`CHOICES_FILE`), both JSON files beside the compile caches (`litllm.compile_decode`, which
compiles, saves and loads the steps).

- When (`compile_choice`, `litllm.compile_decode.step_engine`, `litllm.generate.decode_engine`): `--compile
  true/false` (`LLM(..., compile=...)`) decides; by default (`--compile` unset) the `LITLLM_COMPILE` environment
  variable (`0`/`false`, `1`/`true`) if set; else a saved step that fits (`litllm.compile_decode`) is loaded (a few
  ms), a long-lived engine (chat, serve: no token count) compiles, and otherwise it is rent or buy, in seconds. On the
  CPU (`EagerAccount`), the rent is the eager decode seconds that default runs of a model and shape spent, measured
  and added to `SECONDS_FILE`, and the price the seconds a compile is expected to take (its last compile measured
  here, `expected_compile_seconds`): the run whose expected eager seconds (its steps x the last measured eager step)
  bring the rent to the price compiles (a one-line note) and saves the step, which every later run loads. Whatever the
  speed-up and the number of runs to come, this costs at most about twice the time of the better choice in hindsight
  (compile at once, or never), as far as the estimates hold: the rent paid before the compile is about the price, and
  the runs after it only gain where the compiled step is the faster. Speculative decoding's two steps, the draft's
  decode step and the model's verify step, are priced apart, each by its own account
  (`litllm.generate.speculative_engine`: a run's steps of each from its tokens and the tokens a round yielded last
  time, `record_tokens_per_round`). On CUDA (no step saved, nothing measured) an engine compiles when it decodes at
  least `PAYS_AFTER_TOKENS` tokens.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from litllm import compile_decode
from litllm.compile_decode import (_config_repr, _machine, _note, _step_length, compile_cache_dir, decode_choices_key,
                                   saved_step_length)
from litllm.cpu_layout import optimize_for_decoding
from litllm.cpu_ops import load_built_library
from litllm.errors import LitLLMError
from litllm.utils import OFF_VALUES, atomic_path, owned_and_private

COMPILE_ENV = "LITLLM_COMPILE"
CHOICES_FILE = "decode_choices.json"
PAYS_AFTER_TOKENS = {"cpu": 512, "cuda": 128}
"""Tokens an engine must decode (over its life) before compiling its step pays, per device type: the default on
CUDA and for GRPO's rollouts; default `generate`/`LLM` runs on the CPU measure seconds instead (`EagerAccount`)."""
SECONDS_FILE = "decode_seconds.json"
"""Per model and engine shape (and step: the decode step, or speculative decoding's verify step), the seconds default
CPU runs spent in that step eagerly for want of a saved one and its last measured cost (`EagerAccount`); per model
and step, the seconds its last compile took (`record_compile_seconds`); per model, draft and proposal count, the
tokens a speculative round yielded in the last run (`record_tokens_per_round`)."""
COMPILE_SECONDS_FIXED, COMPILE_SECONDS_PER_LAYER = 20.0, 8.0
"""What compiling a CPU step takes, in seconds, fixed and per layer (`expected_compile_seconds`: the shape by which
a compile measured here is scaled to another layer count, and the guess where none was): 36, 68 and 116 s for 2, 6
and 12 layers, against 39/28, 95/87 and 111/113 s measured (empty/filled inductor cache; 768 wide; a 2-core AVX2
EPYC at load average 5-9, tutorials/inference_measurements.md#compiled-notes); a measured compile scaled by it to
another of these layer counts gave 0.6-1.8x the measured time."""
PROBE_STEPS = 4
"""Eager decode steps that time one (`EagerAccount.step_seconds`) in the first default run of a model and shape."""


def _read_record(path: Path) -> dict:
    """One of litllm's JSON records beside the caches (`CHOICES_FILE`, `SECONDS_FILE`) as a dict; {} when it
    is absent, torn, foreign, or writable by another user (`owned_and_private`): a cache, so what it said is worked out
    again."""
    try:
        if not owned_and_private(path):
            return {}
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_record(path: Path, data: dict) -> None:
    """Write a JSON record atomically, readable by all and writable by this user only (whatever the umask: a
    group-writable record would not be read back, `_read_record`)."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True), encoding="utf-8")
        tmp.chmod(0o644)


def recorded_decode_choices(key: str) -> Optional[dict]:
    """`{"layout": ..., "threads": n}` that a compiled run recorded under `key` (`decode_choices_key`), or None
    (also for a record whose threads were not picked by timing the compiled step, `pick_compiled_threads`)."""
    choice = _read_record(compile_cache_dir() / CHOICES_FILE).get(key)
    if isinstance(choice, dict) and isinstance(choice.get("layout"), str) and isinstance(choice.get("threads"), int) \
            and choice.get("threads_by") == "compiled":
        return {"layout": choice["layout"], "threads": choice["threads"]}
    return None


def record_decode_choices(key: str, layout: str, threads: int) -> None:
    """Remember the weight layout and thread count (picked by timing the compiled step, `pick_compiled_threads`) a
    model (`decode_choices_key`, taken as loaded) decodes with here (see the module doc); written atomically."""
    path = compile_cache_dir() / CHOICES_FILE
    with _locked(path):  # tensor-parallel ranks record theirs at the same moment: one after the other
        choices = _read_record(path)
        entry = {"layout": layout, "threads": threads, "threads_by": "compiled"}
        if choices.get(key) == entry:
            return
        choices[key] = entry
        _write_record(path, choices)


@contextlib.contextmanager
def _locked(path: Path):
    """Hold an exclusive lock on `path`'s lock file (`<path>.lock`) for a read-modify-write of `path` (where the
    platform has `fcntl`; a folder that can't take the lock file: unlocked, as the write then fails anyway)."""
    try:
        import fcntl

        path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(path.with_name(path.name + ".lock"), "a")
    except (ImportError, OSError):
        yield
        return
    with handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def choose_decode_layout(model, pick_threads: Optional[Callable[[torch.nn.Module], int]]) -> int:
    """Lay `model`'s weights out for decoding (`litllm.cpu_layout.optimize_for_decoding`) as a compiled run recorded
    for it here (`recorded_decode_choices`), else as timed now, and return the thread count: the recorded one, else
    `pick_threads(model)` (`litllm.inference.pick_decode_threads`), or with None torch's count, untimed (a
    tensor-parallel rank: its share of the cores, `litllm.parallel.runtime`). `model.decode_choices` says what was
    chosen, and under which key, for `record_decode_choices`."""
    key = decode_choices_key(model)
    on_cpu = model.wte.weight.device.type == "cpu"
    if on_cpu:
        load_built_library()  # where built: the eager ops' per-call lookups read what is loaded (`bf16_norm_op`)
    recorded = recorded_decode_choices(key) if on_cpu else None
    if recorded is not None:
        try:
            forced = None if recorded["layout"] == "unchanged" else recorded["layout"]  # (no Linear to lay out)
            layout, threads = optimize_for_decoding(model, layout=forced), recorded["threads"]
        except LitLLMError:  # that layout no longer works here: pick again
            recorded = None
    if recorded is None:
        layout = optimize_for_decoding(model)
        threads = torch.get_num_threads() if pick_threads is None else pick_threads(model)
    # timed "eager" here: a compiled run times its own step at these counts and records that pick (`decode_engine`)
    by = "record" if recorded is not None else "eager" if pick_threads is not None else "share"
    model.decode_choices = {"key": key, "layout": layout, "threads": threads, "threads_by": by}
    return threads


def env_compile() -> Optional[bool]:
    """`$LITLLM_COMPILE` as a bool (None when unset or empty)."""
    value = os.environ.get(COMPILE_ENV, "").strip().lower()
    if not value:
        return None
    if value in ("1", "true", "yes", "on"):
        return True
    if value in OFF_VALUES:
        return False
    raise LitLLMError(f"${COMPILE_ENV}: expected 0/false or 1/true, got {value!r}")


def should_compile(compile: Optional[bool], device, tokens: Optional[int]) -> bool:
    """Compile the decode step? `compile` as given; None: `$LITLLM_COMPILE`, else whether an engine that decodes
    `tokens` tokens over its life (None: long-lived, e.g. a server) on `device` gets back the compile cost."""
    if compile is not None:
        return compile
    from_env = env_compile()
    if from_env is not None:
        return from_env
    threshold = PAYS_AFTER_TOKENS.get(torch.device(device).type)
    return threshold is not None and (tokens is None or tokens >= threshold)


def compile_choice(compile: Optional[bool], device, tokens: Optional[int]) -> Optional[bool]:
    """How an engine's decode step is made (`step_engine`): True compiled (or loaded, when saved), as
    `should_compile` says; False eager, nothing loaded (`compile` or `$LITLLM_COMPILE` false); None, the default
    where compiling does not pay: a saved compiled step if one fits (loading one costs a few ms), else eager."""
    if should_compile(compile, device, tokens):
        return True
    return None if compile is None and env_compile() is None else False


def _digest(text: str) -> str:
    """A ledger key: 20 hex digits of `text`'s SHA-1."""
    return hashlib.sha1(text.encode()).hexdigest()[:20]


def _model_key(model, kind: str = "") -> str:
    """What a compile's seconds are recorded under (`record_compile_seconds`): the model as loaded
    (`decode_choices_key`: this CPU, torch, the thread budget, the weights' names/shapes/dtypes; not the layout and
    thread count the loader picks by timing, which may differ from run to run until a compiled run records them),
    its config and the step (`kind`: "" the decode step, else `_verify_kind`'s)."""
    choices = getattr(model, "decode_choices", None)  # as `load_for_decoding` keyed them, before the layout
    loaded = choices["key"] if choices else decode_choices_key(model)
    return _digest(f"{loaded}|{_config_repr(model)}{kind}")


def _eager_key(model, rows: int, length: int, kind: str = "") -> str:
    """What the eager seconds of default runs count toward: the model (`_model_key`), the step (`kind`) and the
    shape a compiled step would have (rows x KV-cache length)."""
    return _digest(f"{_model_key(model)}|{rows}x{length}{kind}")


def _seconds(value) -> Optional[float]:
    """A recorded duration: a finite number >= 0; else None (a torn or foreign value: as if unrecorded)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        return None
    return float(value)


LEDGER_PARTS = ("eager", "compile", "speculative")


def _ledger() -> dict[str, dict]:
    """`SECONDS_FILE`'s parts, `{"eager": {shape key: entry}, "compile": {model key: entry}, "speculative": {pair
    key: entry}}` (a part that is no dict: empty)."""
    data = _read_record(compile_cache_dir() / SECONDS_FILE)
    return {part: data[part] if isinstance(data.get(part), dict) else {} for part in LEDGER_PARTS}


def _update_ledger(part: str, key: str, change: Callable[[dict], Optional[dict]]) -> None:
    """Write `SECONDS_FILE` with `part[key]` replaced by `change(its entry, {} if none)` (None: removed), the rest as
    read now (another process may have written since this one read it)."""
    ledger = _ledger()
    entry = ledger[part].get(key)
    entry = change(dict(entry) if isinstance(entry, dict) else {})
    if entry is None:
        ledger[part].pop(key, None)
    else:
        ledger[part][key] = entry
    try:
        _write_record(compile_cache_dir() / SECONDS_FILE, ledger)
    except LitLLMError:  # a read-only or full cache: unrecorded, as without the file
        pass


def record_compile_seconds(model, seconds: float, kind: str = "") -> None:
    """Remember what compiling `model`'s step (a CPU one; `kind`: "" the decode step, else `_verify_kind`'s) took
    here: the price of the next compile of it, and, scaled by layer count, of models never compiled here
    (`expected_compile_seconds`)."""
    if model.wte.weight.device.type == "cpu":
        entry = {"seconds": round(seconds, 3), "layers": model.config.n_layer, "machine": _machine()}
        _update_ledger("compile", _model_key(model, kind), lambda _: entry)


def record_step_compile(model, engine, kind: str = "") -> None:
    """Record what building `engine`'s compiled step of `model` took (`kind`: "" the decode step, else
    `_verify_kind`'s) as that step's compile here (`record_compile_seconds`), where this process compiled it
    (`engine.step_source` "compiled", or "torch.compile": compiled at its first run, which `engine.compile_seconds`
    covers: `litllm.generate.decode_engine`'s warm-up, `litllm.compile_decode.verify_engine`'s first check); a step
    loaded from the cache took a load, not a compile. The one way every engine's step records its compile:
    `generate`'s and `chat`'s (with a draft, the draft's decode step and the model's verify step), `serve`'s
    (`litllm.speculative.SpeculativeBatchEngine`: its batched step and, `engine` the `litllm.compile_decode.SlotSteps`
    of its rounds, the draft's steps and the verify step) and GRPO's rollouts' (`litllm.grpo.rollout.rollout_engine`)."""
    seconds = getattr(engine, "compile_seconds", None)
    if getattr(engine, "step_source", None) in ("compiled", "torch.compile") and seconds is not None:
        record_compile_seconds(model, seconds, kind)


def expected_compile_seconds(model, compiles: dict, kind: str = "") -> tuple[float, str]:
    """What compiling `model`'s step (`kind`: "" the decode step, else `_verify_kind`'s) is expected to take here,
    and whence: that step's last compile measured here (`compiles`, `SECONDS_FILE`'s "compile" part); for a verify
    step never compiled, the model's decode step's (the same graph over k + 1 tokens); else the most recent compile of
    another model on this machine, scaled to this layer count as `COMPILE_SECONDS_FIXED` +
    `COMPILE_SECONDS_PER_LAYER` x layers scale; else that guess."""
    def guess(layers: int) -> float:
        return COMPILE_SECONDS_FIXED + COMPILE_SECONDS_PER_LAYER * layers

    layers = model.config.n_layer
    for key, whence in ((_model_key(model, kind), "its last compile here"),
                        (_model_key(model), "its decode step's last compile here")):
        mine = compiles.get(key)
        if isinstance(mine, dict) and _seconds(mine.get("seconds")) is not None:
            return mine["seconds"], whence
    machine = _machine()
    others = [entry for entry in compiles.values() if isinstance(entry, dict) and entry.get("machine") == machine
              and _seconds(entry.get("seconds")) and isinstance(entry.get("layers"), int) and entry["layers"] > 0]
    if others:
        other = others[-1]  # the latest written (JSON objects keep their order; a rewrite moves a key to the end)
        return other["seconds"] * guess(layers) / guess(other["layers"]), f"a {other['layers']}-layer model's here"
    return guess(layers), "a guess: none measured here"


def note_compile(model) -> None:
    """One line before a CPU decode step compiles that no `EagerAccount` announced (`chat`, `serve`, `--compile
    true`: a long-lived or asked-for compile), so a start that takes a minute says why."""
    price, priced_by = expected_compile_seconds(model, _ledger()["compile"])
    _note(f"compiling the decode step once for this model and shape, ~{price:.0f} s ({priced_by}); "
          f"{_later_runs(compile_decode.steps_save(model))}; --compile false or {COMPILE_ENV}=0 opts out")


def _later_runs(saved: bool) -> str:
    return "later runs load it in milliseconds" if saved else "it is not saved here: later runs compile it again"


class EagerAccount:
    """Compiling amortised over default CPU runs of one model and engine shape while no saved step fits it (see
    the module doc: rent or buy, in seconds). `seconds`: the eager decode seconds earlier runs spent (the rent
    paid so far); `step_seconds`: the last measured eager decode step (None: never timed here); `price`: the
    expected compile seconds (`expected_compile_seconds`); `unsaved`: its compile could not be saved
    (`torch.compile`'s path), so only a run that pays for it on its own compiles. `kind`: the step, "" the decode
    step, else speculative decoding's verify step (`_verify_kind`), whose account is its own."""

    def __init__(self, model, rows: int, length: int, kind: str = "") -> None:
        self.rows, self.kind, self.key = rows, kind, _eager_key(model, rows, length, kind)
        ledger = _ledger()
        entry = ledger["eager"].get(self.key)
        entry = entry if isinstance(entry, dict) else {}
        self.seconds = _seconds(entry.get("seconds")) or 0.0
        self.step_seconds = _seconds(entry.get("step_seconds"))
        self.unsaved = entry.get("unsaved") is True or not compile_decode.steps_save(model)
        self.price, self.priced_by = expected_compile_seconds(model, ledger["compile"], kind)

    def pays(self, tokens: int) -> bool:
        """Does compiling now pay for a run that runs the step for `tokens` tokens (`step_seconds` known; a verify
        step: `tokens` is its rounds): the eager seconds it would spend (its steps, `tokens` over the rows, each
        `step_seconds`) and those earlier runs spent reach the price? If so, says so in one line first."""
        now = math.ceil(tokens / self.rows) * self.step_seconds
        before = 0.0 if self.unsaved else self.seconds
        if before + now < self.price:
            return False
        step, decoding = ("verify step", "eager verifying") if self.kind else ("decode step", "eager decoding")
        _note(f"compiling the {step} once for this model and shape: {decoding} took {before:.1f} s in "
              f"earlier runs and would take ~{now:.1f} s now, >= the ~{self.price:.0f} s a compile is expected to "
              f"take ({self.priced_by}); {_later_runs(not self.unsaved)}; --compile false or {COMPILE_ENV}=0 "
              "opts out")
        return True

    def add(self, seconds: float, steps: int) -> None:
        """Record a run's eager decode: `seconds` added to the rent, and `seconds / steps` the step's cost."""
        def change(entry: dict) -> dict:
            entry["seconds"] = round((_seconds(entry.get("seconds")) or 0.0) + seconds, 4)
            if steps:
                entry["step_seconds"] = round(seconds / steps, 6)
            return entry

        _update_ledger("eager", self.key, change)

    def settle(self, saved: bool) -> None:
        """After the compile `pays` asked for: the rent goes (the step is saved: later runs load it), or, where it
        could not be saved, the shape is marked so that later runs compile only where they pay for it alone."""
        step = {"step_seconds": self.step_seconds} if self.step_seconds is not None else {}
        _update_ledger("eager", self.key, lambda _: None if saved else {"unsaved": True, "seconds": 0.0, **step})


def eager_account(model, rows: int, length: int, exact: bool = False, kind: str = "") -> Optional[EagerAccount]:
    """The `EagerAccount` of a default run of `model`'s step (`kind`) on the CPU with `rows` rows of `length`
    positions (its step would have `_step_length`'s), None where it has none: off the CPU (steps are saved on the CPU
    only), or where a saved step fits (it is loaded)."""
    if model.wte.weight.device.type != "cpu" or saved_step_length(model, rows, length, exact, kind) is not None:
        return None
    return EagerAccount(model, rows, _step_length(model, length, exact), kind)


def _pair_key(model, draft, k: int) -> str:
    return _digest(f"{_model_key(model)}|{_model_key(draft)}|{k}")


def record_tokens_per_round(model, draft, k: int, tokens_per_round: float) -> None:
    """Remember the tokens a speculative round of `model` with `draft` and `k` proposals yielded in a run (1 + k x
    its acceptance rate): how many rounds, draft steps and verify steps a later run's tokens take
    (`expected_tokens_per_round`)."""
    if model.wte.weight.device.type == "cpu":
        _update_ledger("speculative", _pair_key(model, draft, k),
                       lambda _: {"tokens_per_round": round(tokens_per_round, 4)})


def expected_tokens_per_round(model, draft, k: int) -> float:
    """The tokens a speculative round of `model` with `draft` and `k` proposals is expected to yield: the last run's
    (`record_tokens_per_round`), else 1 (no proposal kept: the most rounds, and draft steps, a run can take)."""
    entry = _ledger()["speculative"].get(_pair_key(model, draft, k))
    measured = _seconds(entry.get("tokens_per_round")) if isinstance(entry, dict) else None
    return min(max(measured or 1.0, 1.0), k + 1.0)


@dataclass
class DecodeTally:
    """The seconds and number of an engine's decode steps (`time_decode`)."""

    seconds: float = 0.0
    steps: int = 0


def time_decode(engine, method: str = "_decode") -> DecodeTally:
    """Time `engine`'s decode steps (or the calls of its `method`: a `SpeculativeEngine`'s `_verify`) from now on
    (the forward a compiled step would replace; on the CPU it returns when computed), into the returned tally."""
    tally, decode = DecodeTally(), getattr(engine, method)

    def timed(*args) -> torch.Tensor:
        t0 = compile_decode.clock()
        logits = decode(*args)
        tally.seconds += compile_decode.clock() - t0
        tally.steps += 1
        return logits

    setattr(engine, method, timed)
    return tally
