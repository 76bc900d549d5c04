"""The compiled decode step: when it is on by default, that it decodes what eager decoding does, and that a second
process loads the step the first saved (no trace), with the weights of the model it runs; a stale, unfitting or
foreign saved step is compiled again."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from litllm.compile_decode import STEPS_FOLDER, compile_cache_dir, compiled_length, decode_choices_key
from litllm.compile_ledger import CHOICES_FILE, COMPILE_ENV, record_decode_choices, should_compile
from litllm.engine import Request
from litllm.errors import LitLLMError


def test_should_compile(monkeypatch):
    monkeypatch.delenv(COMPILE_ENV, raising=False)
    assert should_compile(True, "cpu", 1) and not should_compile(False, "cpu", 10_000)
    assert not should_compile(None, "cpu", 50)  # a 50-token generate doesn't get the compile time back
    assert should_compile(None, "cpu", 512) and should_compile(None, "cpu", None)  # long, or long-lived
    assert should_compile(None, "cuda", 128) and not should_compile(None, "meta", None)
    monkeypatch.setenv(COMPILE_ENV, "0")
    assert not should_compile(None, "cpu", None) and should_compile(True, "cpu", 1)
    monkeypatch.setenv(COMPILE_ENV, "true")
    assert should_compile(None, "cpu", 1) and not should_compile(False, "cpu", 1)
    monkeypatch.setenv(COMPILE_ENV, "maybe")
    with pytest.raises(LitLLMError, match=COMPILE_ENV):
        should_compile(None, "cpu", 1)


def test_compiled_length_and_cache_dir(monkeypatch, tmp_path):
    assert compiled_length(40, 2048) == 256 and compiled_length(300, 2048) == 512 and compiled_length(512, 2048) == 512
    assert compiled_length(40, 100) == 100 and compiled_length(1500, 1024) == 1500  # never below what was asked
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    assert compile_cache_dir() == tmp_path
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert compile_cache_dir() == tmp_path / "litllm" / "torch_compile"
    # inductor puts its own default there the first time it looks for its cache (`import torchao` does): not the
    # user's choice, so litllm's folder still
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    assert Path(cache_dir()) != tmp_path / "litllm" / "torch_compile"
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == cache_dir()
    assert compile_cache_dir() == tmp_path / "litllm" / "torch_compile"


def test_compile_false_skips_compiling(tiny_checkpoint, monkeypatch, capsys):
    from litllm.generate import generate

    monkeypatch.setenv(COMPILE_ENV, "1")  # the default would compile; --compile false wins
    generate(tiny_checkpoint, "Hello", max_new_tokens=4, temperature=0.0, compile=False)
    assert "Compiled the decode step" not in capsys.readouterr().err


def test_recorded_decode_choices_are_reused_without_timing(tiny_checkpoint, monkeypatch, tmp_path):
    from litllm import inference

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    (tmp_path / CHOICES_FILE).write_text("{not json")  # a torn record is no record: picked by timing
    model, _ = inference.load_for_decoding(tiny_checkpoint, "cpu", "32-true")
    key = model.decode_choices["key"]
    bf16, _ = inference.load_for_decoding(tiny_checkpoint, "cpu", "bf16-true")
    assert bf16.decode_choices["key"] != key  # another precision, other kernels: its own record
    with monkeypatch.context() as env:  # another OpenMP wait policy (litllm.bound_omp_spin): threads picked again
        env.setenv("GOMP_SPINCOUNT", "12345")
        other = decode_choices_key(model)
    assert other != decode_choices_key(model)
    record_decode_choices(key, "column-major", 1)

    def timed_again(*args, **kwargs):
        raise AssertionError("the recorded choice was not used")

    monkeypatch.setattr(inference, "pick_decode_threads", timed_again)
    model, threads = inference.load_for_decoding(tiny_checkpoint, "cpu", "32-true")
    assert threads == 1
    assert model.decode_choices == {"key": key, "layout": "column-major", "threads": 1, "threads_by": "record"}
    assert not model.blocks[0].attn.qkv.weight.is_contiguous()  # laid out as recorded (a transposed view)


def test_a_model_over_several_devices_decodes_eagerly_by_default(tiny_checkpoint, monkeypatch):
    from litllm.generate import decode_engine
    from litllm.model import GPT

    monkeypatch.setenv(COMPILE_ENV, "1")  # the default would compile
    model = GPT.from_checkpoint(tiny_checkpoint).eval()
    model.block_devices = ["cpu", "cpu"]  # as `--strategy sequential` marks it (tensor parallel compiles: test_parallel)
    assert not decode_engine(model, None, 1, 64, None)._compiled  # compiling it is not supported


SPY = """
from litllm.engine import Engine
tokens = []  # every token the engines decode
step = Engine.step
def spy(self):
    out = step(self)
    tokens.extend(t for o in out for t in o.token_ids)
    return out
Engine.step = spy
"""
# inductor's compiler and its loaders of compiled artifacts: the saved step loads without them
COMPILER_MODULES = ["torch._inductor.compile_fx", "torch._inductor.codecache", "torch._inductor.graph",
                    "torch._inductor.package", "torch._inductor.lowering"]
# a fresh process: `litllm generate` of 12 tokens with the default --compile ($LITLLM_COMPILE=1 stands for a long
# generation), reporting the tokens, how many graphs dynamo traced and which compiler modules it imported
CHILD = SPY + """
import json, sys
from torch._dynamo.utils import counters
from litllm.generate import generate
generate(sys.argv[1], "Hello", max_new_tokens=12, temperature=0.0)
imported = [m for m in sys.argv[2:] if m in sys.modules]
print(json.dumps({"tokens": tokens, "traced": counters["stats"]["unique_graphs"], "imported": imported}))
"""


@pytest.fixture(scope="module")
def saved_step(tiny_checkpoint, tmp_path_factory):
    """Two fresh processes generating 12 tokens with the tiny model and a fresh cache: the first, told to compile
    ($LITLLM_COMPILE=1), compiles the decode step and saves it; the second, with the defaults (a short generate),
    loads it. Returns (cache, eager tokens, first process's report and stderr, second's)."""
    cache = tmp_path_factory.mktemp("compile") / "cache"
    # no thread pin: the first process records the thread count and weight layout it picked by timing (which the
    # compiled kernels depend on), and the second takes them from there
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(cache)}
    env.pop(COMPILE_ENV, None)

    def run(**extra) -> tuple[dict, str]:
        proc = subprocess.run([sys.executable, "-c", CHILD, str(tiny_checkpoint), *COMPILER_MODULES],
                              env={**env, **extra}, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout.strip().splitlines()[-1]), proc.stderr

    eager = {}
    exec(SPY, eager)  # the same spy in this process, around an eager generate
    try:
        from litllm.generate import generate

        generate(tiny_checkpoint, "Hello", max_new_tokens=12, temperature=0.0, compile=False)
    finally:
        eager["Engine"].step = eager["step"]
    return cache, eager["tokens"], run(**{COMPILE_ENV: "1"}), run()


@pytest.mark.slow
def test_default_compiled_decode_equals_eager_and_second_process_loads_the_saved_step(saved_step):
    cache, eager, (first, first_err), (second, second_err) = saved_step
    assert "Compiled the decode step" in first_err and str(cache) in first_err
    assert first["tokens"][2:] == eager  # after the 2-token warm-up: the same greedy tokens
    assert first["traced"] == 0  # exported (no dynamo graph), compiled by AOTInductor: no torch.compile fallback
    recorded = json.loads((cache / CHOICES_FILE).read_text())  # the loader's layout, the compiled step's threads
    assert [choice["threads_by"] for choice in recorded.values()] == ["compiled"], recorded
    saved = list((cache / STEPS_FOLDER).glob("*/*"))
    assert [p.name for p in saved] == ["1x128.pt2"]  # the AOTInductor package (without the weights: see below)
    # the second process, a short generate, loads the saved step by default: no trace, no compile, no compiler
    assert "Loaded the saved compiled decode step" in second_err, second_err
    assert second["tokens"] == eager  # (no warm-up: nothing to compile)
    assert second["traced"] == 0 and second["imported"] == [], second  # no torch.compile fallback either
    assert first["imported"], first  # (the check can fail: the compiling process has them)


@pytest.mark.slow
def test_a_process_that_takes_recorded_choices_compiles_a_new_step(saved_step, tiny_checkpoint, tmp_path):
    # the choices recorded by the first process spare this one the timing runs, so the first forward of its model
    # is the one torch.export traces: nothing it computes may stay behind for the eager steps (a cached scalar
    # tensor once did: made under the trace, a fake tensor, which the eager prefill then failed on)
    import shutil

    cache, eager = tmp_path / "cache", saved_step[1]
    shutil.copytree(saved_step[0], cache, ignore=shutil.ignore_patterns(STEPS_FOLDER))
    assert (cache / CHOICES_FILE).is_file()
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(cache), COMPILE_ENV: "1"}
    proc = subprocess.run([sys.executable, "-c", CHILD, str(tiny_checkpoint)], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "Compiled the decode step" in proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1])["tokens"][2:] == eager


@pytest.mark.slow
def test_a_saved_step_takes_the_weights_of_the_model_it_runs(saved_step, tmp_path, monkeypatch):
    # another checkpoint of the same shapes (other weights): it finds and loads the saved step, which reads the
    # weights from the model it is given (they are not saved in it), so it decodes what this model decodes eagerly
    from conftest import make_converted_checkpoint
    from litllm.engine import Engine
    from litllm.generate import decode_engine
    from litllm.inference import load_for_decoding
    from litllm.tokenizer import Tokenizer

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(saved_step[0]))
    other = make_converted_checkpoint(tmp_path / "other", seed=1)
    model, threads = load_for_decoding(other, "cpu", "32-true")  # the recorded layout and threads: the same shapes
    tokenizer, prompt = Tokenizer(other), [2, 40, 41, 42]
    loaded = decode_engine(model, tokenizer, 1, 20, threads, True, 12)
    assert loaded.step_source == "loaded" and loaded.max_seq_length == 128  # the saved length that fits
    eager = Engine(model, tokenizer, 1, 128)
    cache = loaded._caches[0].k
    assert greedy_tokens(loaded, prompt) == greedy_tokens(eager, prompt)
    # the saved step wrote the keys and values into the engine's own cache, in place (no per-token copy)
    assert loaded._caches[0].k is cache and cache.abs().sum() > 0
    torch.testing.assert_close(cache[:, :, :16], eager._caches[0].k[:, :, :16])


def greedy_tokens(engine, prompt: list[int], n: int = 12) -> list[int]:
    with engine:
        engine.add(Request(prompt, n))
        tokens = []
        while engine.has_unfinished:
            tokens.extend(t for out in engine.step() for t in out.token_ids)
    return tokens


@pytest.mark.slow
def test_a_stale_or_foreign_saved_step_is_compiled_again(saved_step, tiny_checkpoint, monkeypatch, capsys):
    # a saved step that does not load (torn, another torch...), does not fit the model (its guards fail), or that
    # another user could have written, is not used: a one-line note, then the step compiles as without one
    from litllm import compile_decode
    from litllm.engine import Engine
    from litllm.inference import load_for_decoding

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(saved_step[0]))
    monkeypatch.setattr(compile_decode, "_compile_and_save", lambda path, engine: None)  # no 1-minute compile
    model, threads = load_for_decoding(tiny_checkpoint, "cpu", "32-true")
    folder = compile_decode.steps_folder(model)
    saved = next(folder.glob("1x*.pt2"))
    length = int(saved.stem.split("x")[1])
    (folder / f"2x{length}.pt2").write_bytes(saved.read_bytes())  # a valid step, for one row, where two are asked
    (folder / f"3x{length}.pt2").write_bytes(saved.read_bytes()[:1000])  # torn
    foreign = folder / f"4x{length}.pt2"
    foreign.write_bytes(saved.read_bytes())
    foreign.chmod(0o666)  # writable by anyone: not loaded
    notes = {2: "does not fit this model", 3: "could not load the saved decode step", 4: "writable by others"}
    for rows, note in notes.items():
        engine = Engine(model, None, rows, length, threads=threads, compile=True)
        assert engine.step_source == "torch.compile"  # the fallback (compiled at its first step)
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("note: ") and note in err, err
        engine.close()
    engine = Engine(model, None, 1, length, threads=threads, compile=True)
    assert engine.step_source == "loaded" and not capsys.readouterr().err
    engine.close()
    # a short run with the defaults uses a saved step that fits; one that does not load leaves it eager (a note)
    from litllm.generate import decode_engine

    monkeypatch.delenv(COMPILE_ENV, raising=False)
    engine = decode_engine(model, None, 3, length, threads, None, 12)
    assert not engine._compiled and "could not load the saved decode step" in capsys.readouterr().err
    engine.close()
    # --compile false, or $LITLLM_COMPILE=0, opts out of the saved step too
    assert not decode_engine(model, None, 1, length, threads, False, 12)._compiled
    monkeypatch.setenv(COMPILE_ENV, "0")
    assert not decode_engine(model, None, 1, length, threads, None, 12)._compiled
    monkeypatch.delenv(COMPILE_ENV)
    assert decode_engine(model, None, 1, length, threads, None, 12).step_source == "loaded"


@pytest.mark.slow
def test_a_one_thread_budget_compiles_its_own_step_with_the_count_baked_in(tiny_checkpoint, monkeypatch, tmp_path):
    """Under a 1-thread budget (`OMP_NUM_THREADS=1`; the benchmarks' `--threads 1`) the compiled step is its own (not
    the core budget's key) and is compiled for 1 thread (`BUDGET_STEP_OPTIONS`): serial kernels, no OpenMP region
    (a step whose regions read the count when they run, `cpp.dynamic_threads`, was 14% slower for int8dq). It
    decodes eager's greedy tokens, its thread count is not timed (1 is all there is), and a later engine under that
    budget loads it."""
    import re
    import zipfile

    from litllm.compile_decode import saved_step_length, steps_folder
    from litllm.engine import Engine
    from litllm.generate import decode_engine
    from litllm.inference import load_for_decoding

    if os.cpu_count() == 1:
        pytest.skip("1 thread is the core count here: the default step")
    def timed(*args, **kwargs):
        raise AssertionError("a 1-thread budget has no thread count to pick")

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv(COMPILE_ENV, raising=False)
    monkeypatch.setattr("litllm.compile_decode.fastest_threads", timed)
    torch.set_num_threads(1)
    model, threads = load_for_decoding(tiny_checkpoint, "cpu", "32-true")
    prompt = [2, 40, 41, 42]
    eager = greedy_tokens(Engine(model, None, 1, 20, threads=threads), prompt)
    engine = decode_engine(model, None, 1, 20, threads, True, 12)
    assert engine.step_source == "compiled" and engine.threads == 1
    (path,) = steps_folder(model).glob("*.pt2")
    with zipfile.ZipFile(path) as package:
        kernels = [package.read(n).decode() for n in package.namelist() if n.endswith("kernel.cpp")]
    assert kernels and not any(re.search(r"#pragma omp (parallel|for|single)", k) for k in kernels)
    assert greedy_tokens(engine, prompt) == eager
    assert decode_engine(model, None, 1, 20, threads, True, 12).step_source == "loaded"
    torch.set_num_threads(os.cpu_count())  # the core budget's step is another (not saved yet)
    assert saved_step_length(model, 1, 20) is None


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["torchao.int8dq", "torchao.int8wo"])
def test_an_int8_step_compiles_to_a_saved_step_that_decodes_as_eager(tiny_checkpoint, monkeypatch, tmp_path, mode):
    """torchao.int8dq and fp32 torchao.int8wo on the CPU (eager: fbgemm's opaque packed weights, `_weight_int8pack_mm`):
    the compiled step multiplies by a plain copy of the int8 weights (`Int8Words.prepare_compiled`), so it exports
    and is saved by AOTInductor like an unquantized step, and a fresh model of the same checkpoint (not yet given that
    copy) finds and loads it; both decode the eager engine's greedy tokens (the step rounds activations otherwise
    than the eager kernels' one-row decode, more finely: test_quantize.py; the tiny model's tokens are the same, and
    those of eager steps within `step_rounding`, which compute as the compiled step does)."""
    pytest.importorskip("torchao")
    from litllm.compile_decode import load_saved_step
    from litllm.engine import Engine
    from litllm.model import GPT
    from litllm.quantize import quantize_model, step_rounding

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "cache"))

    def model():
        return quantize_model(GPT.from_checkpoint(tiny_checkpoint).eval(), mode, "cpu")

    def decode(engine):
        return greedy_tokens(engine, list(range(1, 9)))

    eager = decode(Engine(model(), None, 1, 64, threads=1))
    with step_rounding():  # eager decode steps computing as the compiled one does: its rounding, the same tokens
        assert decode(Engine(model(), None, 1, 64, threads=1)) == eager
    compiled = Engine(model(), None, 1, 64, threads=1, compile=True)
    assert decode(compiled) == eager and compiled.step_source == "compiled"  # AOTInductor, not torch.compile
    fresh = Engine(model(), None, 1, 64, threads=1)
    assert fresh.model.blocks[0].attn.qkv.words is None  # the copy is made only where a step is there to load
    assert load_saved_step(fresh) and fresh.step_source == "loaded"
    assert decode(fresh) == eager


def test_saved_step_length(tiny_checkpoint, monkeypatch, tmp_path):
    from litllm.compile_decode import cpu_compile_options, saved_step_length, steps_folder
    from litllm.model import GPT

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    model = GPT.from_checkpoint(tiny_checkpoint).eval()
    assert saved_step_length(model, 1, 40) is None  # nothing saved
    folder = steps_folder(model)
    folder.mkdir(parents=True)
    for name in ("1x64.pt2", "1x100.pt2", "2x50.pt2", "1x32.pt2", "1x1024.pt2", "1xab.pt2", "1x80.pt"):
        (folder / name).touch()
    assert saved_step_length(model, 1, 40) == 64  # the shortest that fits, within the window (128)
    assert saved_step_length(model, 1, 70) == 100 and saved_step_length(model, 1, 101) is None
    assert saved_step_length(model, 2, 40) == 50 and saved_step_length(model, 1, 40, exact=True) is None
    budget = torch.get_num_threads()
    try:  # compiled at the core count, its kernels take torch's count when they run; at another budget they are
        # compiled with cpp.dynamic_threads (other kernels, another folder), at a budget of 1 for 1 thread (another)
        torch.set_num_threads(os.cpu_count())
        options = cpu_compile_options(model)
        assert "cpp.dynamic_threads" not in options and "cpp.threads" not in options
        cores = steps_folder(model)
        torch.set_num_threads(os.cpu_count() + 1)
        assert cpu_compile_options(model) == {**options, "cpp.dynamic_threads": True}
        other = steps_folder(model)
        torch.set_num_threads(1)
        if os.cpu_count() > 1:
            assert cpu_compile_options(model) == {**options, "cpp.threads": 1}
            assert len({cores, other, steps_folder(model)}) == 3
    finally:
        torch.set_num_threads(budget)
    monkeypatch.setattr("litllm.compile_decode.CPU_COMPILE_OPTIONS", {})  # steps compiled with other settings
    assert steps_folder(model) != folder and saved_step_length(model, 1, 40) is None


# ---------------------------------------------------------------------- compiling amortised over short runs
class FakeClock:
    """Time that moves only when told: `step` seconds per interval timed (every second read: `time_decode` reads it
    twice per decode step, `step_engine` and the warm-up twice each), plus `compile` seconds per fake compile."""

    def __init__(self, step: float = 1.0, compile: float = 100.0) -> None:
        self.now, self.step, self.compile, self.reads = 0.0, step, compile, 0
        self.compiled: dict[int, float] = {}  # extra seconds of a compiled step per torch thread count
        self.compiled_at: list[int] = []  # the thread count of each compiled step run

    def __call__(self) -> float:
        self.reads += 1
        if self.reads % 2 == 0:  # the end of a timed interval: a decode step
            self.now += self.step
        return self.now


@pytest.fixture
def fake_compile(monkeypatch, tmp_path):
    """A fresh cache, the default `--compile`, 15 s of expected compile per layer (the tiny model's 2: 30 s), a
    fake clock (`FakeClock`, returned: 1 s per eager decode step unless changed), and compiling ahead of time
    replaced by the eager step (a file saved as the step, so that later runs find and "load" it) that takes
    `clock.compile` seconds: the policy without a 1-minute compile nor a real timing. Returns (the ledger's path,
    the clock)."""
    from litllm import compile_decode, compile_ledger
    from litllm.cpu_ops import row_split_op

    row_split_op()  # built (once per machine) before the test: its build note is not one of the lines a test reads
    clock = FakeClock()

    def load(path, engine, inputs=None):
        verify = "-verify" in path.name  # speculative decoding's check: logits at every position

        def step(tokens, pos, kv_len=None):  # (a saved step attends over the first `kv_len` positions, rounded up)
            clock.compiled_at.append(torch.get_num_threads())
            clock.now += clock.compiled.get(torch.get_num_threads(), 0.0)
            logits = engine.model.decode(tokens, input_pos=pos, kv_len=kv_len)
            return logits if verify else logits[:, -1]  # (B, padded_vocab)

        return step

    def compile_and_save(path, engine, step=None, inputs=None):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()
        clock.now += clock.compile
        return load(path, engine, inputs)

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv(COMPILE_ENV, raising=False)
    monkeypatch.setattr(compile_ledger, "COMPILE_SECONDS_FIXED", 0.0)
    monkeypatch.setattr(compile_ledger, "COMPILE_SECONDS_PER_LAYER", 15.0)
    monkeypatch.setattr(compile_decode, "clock", clock)
    monkeypatch.setattr(compile_decode, "_load_step", load)
    monkeypatch.setattr(compile_decode, "_compile_and_save", compile_and_save)
    return tmp_path / compile_ledger.SECONDS_FILE, clock


def runs(model, threads, n: int, compile=None, tokens: int = 12, rows: int = 1) -> list[str]:
    """How `n` runs that decode `tokens` tokens each (`tokens - 1` decode steps: the first is the prefill's)
    decode: "eager", or their step's source."""
    from litllm.generate import decode_engine

    sources = []
    for _ in range(n):
        with decode_engine(model, None, rows, 20, threads, compile, tokens) as engine:
            sources.append(engine.step_source if engine._compiled else "eager")
            engine.add(Request([1, 2, 3], tokens))
            while engine.has_unfinished:
                engine.step()
    return sources


def eager_ledger(path) -> list[dict]:
    return list(json.loads(path.read_text())["eager"].values())


def test_short_runs_compile_once_their_eager_seconds_reach_the_compile_seconds(tiny_checkpoint, fake_compile,
                                                                                capsys):
    from litllm.inference import load_for_decoding

    ledger, clock = fake_compile
    model, threads = load_for_decoding(tiny_checkpoint, "cpu", "32-true")
    # the first run times 4 eager steps (1 s each), expects 12 s of decoding (< the 30 s of a 2-layer compile),
    # decodes eagerly and records what it spent when it closes: 4 + 11 steps; the second: 15 + 12 < 30
    assert runs(model, threads, 2) == ["eager", "eager"]
    assert eager_ledger(ledger) == [{"seconds": 26.0, "step_seconds": 1.0}] and not capsys.readouterr().err
    assert runs(model, threads, 1, rows=2) == ["eager"]  # another shape counts apart
    assert sorted(e["seconds"] for e in eager_ledger(ledger)) == [15.0, 26.0]
    assert runs(model, threads, 1) == ["compiled"]  # 26 + 12 >= 30: this one compiles, saying so in one line
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("note: compiling the decode step once") and "26.0 s" in err
    assert "~12.0 s now" in err and "~30 s" in err and "--compile false" in err and f"{COMPILE_ENV}=0" in err, err
    assert [e["seconds"] for e in eager_ledger(ledger)] == [15.0]  # its rent went with the compile
    compiles = list(json.loads(ledger.read_text())["compile"].values())
    assert [(c["seconds"], c["layers"]) for c in compiles] == [(102.0, 2)]  # it took 100 s (+ 2 timed intervals)
    assert runs(model, threads, 3) == ["loaded"] * 3 and not capsys.readouterr().err  # later runs load it
    assert [e["seconds"] for e in eager_ledger(ledger)] == [15.0]  # nothing counted while a step loads
    # the 2-row shape is now priced by that measured compile (102 s): its second run does not compile yet
    assert runs(model, threads, 1, rows=2) == ["eager"]
    assert [e["seconds"] for e in eager_ledger(ledger)] == [26.0]


@pytest.mark.parametrize("compile", [None, True], ids=["long-lived", "asked-for"])
def test_a_compile_no_account_announced_says_so_once(tiny_checkpoint, fake_compile, capsys, compile):
    """A long-lived engine (`chat`, `serve`: `tokens` None) or `--compile true` compiles without the rent-or-buy
    account's note: it says so in one line before the minute it takes, and a later start that loads it says nothing."""
    from litllm.generate import decode_engine
    from litllm.inference import load_for_decoding

    model, threads = load_for_decoding(tiny_checkpoint, "cpu", "32-true")
    sources = []
    for _ in range(2):
        with decode_engine(model, None, 1, 20, threads, compile, None) as engine:
            sources.append(engine.step_source)
        sources.append(capsys.readouterr().err)
    assert sources[0] == "compiled" and sources[2] == "loaded", sources
    assert sources[1].count("\n") == 1 and sources[1].startswith("note: compiling the decode step once"), sources[1]
    assert "~30 s" in sources[1] and f"{COMPILE_ENV}=0" in sources[1], sources[1]
    assert sources[3] == "", sources[3]


@pytest.mark.parametrize("step, sources", [(1.0, ["eager", "eager", "compiled"]), (2.0, ["eager", "compiled"]),
                                           (3.0, ["compiled"])])
def test_a_dearer_eager_step_compiles_sooner(tiny_checkpoint, fake_compile, step, sources):
    # the same model and compile price: runs whose eager step costs more reach it in fewer runs, and a run whose
    # own eager seconds reach it (12 tokens x 3 s >= 30 s) compiles at once, after its 4 timed steps
    from litllm.inference import load_for_decoding

    fake_compile[1].step = step
    model, threads = load_for_decoding(tiny_checkpoint, "cpu", "32-true")
    assert runs(model, threads, len(sources)) == sources


def test_the_generate_that_brings_the_seconds_to_the_price_compiles(tiny_checkpoint, fake_compile, capsys):
    from litllm.generate import generate

    answers = []
    for _ in range(3):  # 4 + 15 s, then 19 + 16 >= 30 s: the second compiles; the third loads
        generate(tiny_checkpoint, "Hello", max_new_tokens=16, temperature=0.0)
        answers.append(capsys.readouterr())
    assert answers[0].out == answers[1].out == answers[2].out  # (the fake compiled step is the eager one)
    assert "decode step" not in answers[0].err
    assert "note: compiling the decode step once" in answers[1].err and "Compiled the decode step" in answers[1].err
    assert "note:" not in answers[2].err and "Loaded the saved compiled decode step" in answers[2].err


def test_the_price_is_the_last_compile_here_else_another_scaled_by_layers(tiny_checkpoint, fake_compile,
                                                                           monkeypatch):
    from litllm import compile_ledger
    from litllm.model import GPT

    model = GPT.from_checkpoint(tiny_checkpoint).eval()
    assert model.config.n_layer == 2 and compile_ledger.expected_compile_seconds(model, {})[0] == 30.0  # none here
    compile_ledger.record_compile_seconds(model, 12.0)
    compiles = compile_ledger._ledger()["compile"]
    assert compile_ledger.expected_compile_seconds(model, compiles) == (12.0, "its last compile here")
    model.config.n_layer = 6  # another model (its config is in the key): the 2-layer one's compile, x 6/2
    assert compile_ledger.expected_compile_seconds(model, compiles)[0] == 36.0
    monkeypatch.setattr(compile_ledger, "COMPILE_SECONDS_FIXED", 30.0)  # 30 + 15 x layers: x (30 + 90) / (30 + 30)
    assert compile_ledger.expected_compile_seconds(model, compiles)[0] == 24.0
    compiles = {key: {**entry, "machine": "another CPU"} for key, entry in compiles.items()}
    assert compile_ledger.expected_compile_seconds(model, compiles)[0] == 120.0  # measured on another machine


def test_opted_out_runs_never_compile_nor_count(tiny_checkpoint, fake_compile, monkeypatch):
    from litllm.inference import load_for_decoding

    ledger = fake_compile[0]
    model, threads = load_for_decoding(tiny_checkpoint, "cpu", "32-true")
    assert runs(model, threads, 4, compile=False) == ["eager"] * 4  # --compile false
    monkeypatch.setenv(COMPILE_ENV, "0")
    assert runs(model, threads, 4) == ["eager"] * 4  # $LITLLM_COMPILE=0
    assert not ledger.exists()
    monkeypatch.delenv(COMPILE_ENV)
    assert runs(model, threads, 1, compile=True) == ["compiled"]  # --compile true compiles at once, uncounted
    assert json.loads(ledger.read_text())["eager"] == {}  # (its compile seconds recorded: the next price)


def test_a_torn_or_foreign_ledger_is_ignored(tiny_checkpoint, fake_compile):
    from litllm.inference import load_for_decoding

    ledger = fake_compile[0]
    model, threads = load_for_decoding(tiny_checkpoint, "cpu", "32-true")
    ledger.write_text("{not json")  # torn: counted from 0, and written whole again
    assert runs(model, threads, 1) == ["eager"]
    ((key, entry),) = json.loads(ledger.read_text())["eager"].items()
    assert entry == {"seconds": 15.0, "step_seconds": 1.0}
    ledger.write_text(json.dumps({"eager": {key: {"seconds": 1e6, "step_seconds": 1.0}}}))
    ledger.chmod(0o666)  # writable by anyone: not read (it would have compiled); probed again
    assert runs(model, threads, 1) == ["eager"]
    assert json.loads(ledger.read_text())["eager"] == {key: entry} and ledger.stat().st_mode & 0o777 == 0o644
    for bad in ("many", -5, float("nan"), float("inf"), True):  # a duration that is none: 0, probed again
        ledger.write_text(json.dumps({"eager": {key: {"seconds": bad, "step_seconds": bad}}}))
        assert runs(model, threads, 1) == ["eager"] and json.loads(ledger.read_text())["eager"] == {key: entry}
    ledger.write_text(json.dumps({"eager": [1, 2], "compile": "none"}))  # parts that are no dicts: empty
    assert runs(model, threads, 1) == ["eager"] and json.loads(ledger.read_text())["eager"] == {key: entry}


def test_a_step_that_could_not_be_saved_compiles_only_where_one_run_pays(tiny_checkpoint, fake_compile,
                                                                         monkeypatch):
    # a model that does not export as one graph compiles lazily with torch.compile, unsaved: the next run would pay
    # the compile again, so later runs compile only where their own eager seconds reach its price
    from litllm import compile_decode, compile_ledger
    from litllm.inference import load_for_decoding

    ledger, clock = fake_compile
    clock.compile = 0.0  # what the warm-up's two steps measure then (2 s) is its compile time: the price
    monkeypatch.setattr(compile_decode, "_compile_and_save", lambda path, engine: None)
    monkeypatch.setattr(compile_decode, "compile_step", lambda step, device, static, options: step)  # (no compile)
    model, threads = load_for_decoding(tiny_checkpoint, "cpu", "32-true")
    monkeypatch.setattr(compile_ledger, "COMPILE_SECONDS_PER_LAYER", 7.5)  # 2 layers: 15 s
    assert runs(model, threads, 3, tokens=5) == ["eager", "eager", "torch.compile"]  # 4 + 4, 8 + 4, 12 + 5 >= 15
    assert eager_ledger(ledger) == [{"unsaved": True, "seconds": 0.0, "step_seconds": 1.0}]
    compiles = list(json.loads(ledger.read_text())["compile"].values())
    assert [c["seconds"] for c in compiles] == [2.0]
    assert runs(model, threads, 2, tokens=1) == ["eager", "eager"]  # 1 s < 2 s: eager, whatever the rent
    assert runs(model, threads, 1, tokens=2) == ["torch.compile"]  # 2 s >= 2 s on its own


def speculative_runs(model, draft, threads, n: int, tokens: int = 12, k: int = 3) -> list[tuple[str, str]]:
    """How `n` default speculative runs (`speculative_engine`, greedy, `tokens` tokens each) decode: (the draft's
    step, the verify step), each "eager" or its source; their tokens are plain decoding's."""
    from litllm.engine import generate_ids
    from litllm.generate import speculative_engine

    sources = []
    for _ in range(n):
        with speculative_engine(model, draft, None, 20, threads, k, tokens=tokens) as engine:
            drafting, checking = engine.engines[1], engine.engines[0]
            sources.append((drafting.step_source if drafting._compiled else "eager",
                            checking.step_source if checking.verify is not None else "eager"))
            engine.add(Request([1, 2, 3], tokens))
            out = []
            while engine.has_unfinished:
                for o in engine.step():
                    out += o.token_ids
        assert out == generate_ids(model, [1, 2, 3], tokens)
    return sources


def _speculative_pair(tiny_checkpoint):
    """The tiny model as loaded for decoding, and a draft: the same weights with another context window (another
    model to the ledger), so that it proposes the model's own tokens (every proposal kept)."""
    from litllm.inference import load_for_decoding
    from litllm.model import GPT

    model, threads = load_for_decoding(tiny_checkpoint, "cpu", "32-true")
    draft = GPT.from_checkpoint(tiny_checkpoint, block_size=64).eval()
    return model, draft, threads


@pytest.mark.parametrize("draft_step, verify_step, sources", [
    (0.1, 3.0, ("eager", "compiled")),  # 12 checks x 3 s >= 30 s: the verify step compiles, the draft's doesn't
    (1.0, 0.1, ("compiled", "eager")),  # 36 draft steps x 1 s >= 30 s: the draft's compiles, the verify step doesn't
    (0.1, 0.1, ("eager", "eager")),
], ids=["dear-verify", "dear-draft", "both-cheap"])
def test_speculative_decoding_prices_the_draft_and_the_verify_step_apart(tiny_checkpoint, fake_compile, draft_step,
                                                                         verify_step, sources):
    """A default speculative run compiles each step where its own measured eager seconds reach its expected compile
    (30 s each for the 2-layer models here): the draft's k = 3 steps a round at its step's cost, and the model's one
    check a round at its check's cost (both injected as measured before); before, the verify step followed the
    draft's (a dear check never compiled while the draft's did not, a cheap one always did where the draft's did)."""
    from litllm import compile_decode, compile_ledger
    from litllm.compile_decode import _verify_kind
    from litllm.compile_ledger import _eager_key

    ledger, clock = fake_compile
    clock.step = 0.0  # what this run measures: nothing (the injected costs decide)
    model, draft, threads = _speculative_pair(tiny_checkpoint)
    for m, kind, seconds in ((draft, "", draft_step), (model, _verify_kind(4), verify_step)):
        key = _eager_key(m, 1, compile_decode._step_length(m, 20, False), kind)
        compile_ledger._update_ledger("eager", key, lambda _, s=seconds: {"seconds": 0.0, "step_seconds": s})
    assert speculative_runs(model, draft, threads, 1) == [sources]


@pytest.mark.parametrize("tokens_per_round, verify_step", [(None, "compiled"), (4.0, "eager")])
def test_speculative_rounds_follow_the_measured_tokens_per_round(tiny_checkpoint, fake_compile, tokens_per_round,
                                                                 verify_step):
    """A run's rounds are its tokens over what a round yielded in the last run with this draft: with checks measured
    at 1 s, 20 s of them spent before and a 30 s verify compile, 12 tokens by rounds of one token (none measured)
    add 12 s and compile; by rounds of 4 tokens they add 3 s and stay eager. A run records what its rounds yielded
    (this draft keeps every proposal: 11 tokens after the prefill's in rounds of 4, 4 and 3)."""
    from litllm import compile_decode, compile_ledger
    from litllm.compile_decode import _verify_kind
    from litllm.compile_ledger import _eager_key

    ledger, clock = fake_compile
    clock.step = 0.0
    model, draft, threads = _speculative_pair(tiny_checkpoint)
    for m, kind, entry in ((draft, "", {"seconds": 0.0, "step_seconds": 0.0}),
                           (model, _verify_kind(4), {"seconds": 20.0, "step_seconds": 1.0})):
        key = _eager_key(m, 1, compile_decode._step_length(m, 20, False), kind)
        compile_ledger._update_ledger("eager", key, lambda _, e=entry: e)
    if tokens_per_round is not None:
        compile_ledger.record_tokens_per_round(model, draft, 3, tokens_per_round)
    assert speculative_runs(model, draft, threads, 1) == [("eager", verify_step)]
    assert compile_ledger.expected_tokens_per_round(model, draft, 3) == round(11 / 3, 4)


def compile_lazily(monkeypatch, clock: FakeClock, seconds: float) -> None:
    """No step exports as one graph: every compiled step is `torch.compile`'s, which compiles at its first call
    (`seconds` on the fake clock)."""
    from litllm import compile_decode

    def lazily_compiled(step, device, static, options):
        calls = []

        def call(*args):
            clock.now += 0.0 if calls else seconds
            calls.append(args)
            return step(*args)

        return call

    monkeypatch.setattr(compile_decode, "_compile_and_save", lambda *args: None)
    monkeypatch.setattr(compile_decode, "compile_step", lazily_compiled)


@pytest.mark.parametrize("exported", [True, False], ids=["aot-inductor", "torch.compile"])
def test_every_compiled_step_records_its_compile_under_its_kind(tiny_checkpoint, fake_compile, monkeypatch, exported):
    """The draft's decode step and the model's verify step record what compiling them took in one way
    (`record_step_compile`: the build through the step's first run), ahead of time (AOTInductor) or lazily where the
    model does not export as one graph (torch.compile: it compiles at its first run); a loaded step records nothing.
    Before, the verify step recorded only an AOTInductor compile, and its seconds did not cover a first run."""
    from litllm import compile_ledger
    from litllm.compile_decode import _verify_kind
    from litllm.compile_ledger import _model_key
    from litllm.generate import speculative_engine

    ledger, clock = fake_compile
    clock.step, clock.compile = 0.0, 40.0  # (the fake AOTInductor compile: 40 s)
    if not exported:
        compile_lazily(monkeypatch, clock, 40.0)
    model, draft, threads = _speculative_pair(tiny_checkpoint)
    for run in range(2):
        with speculative_engine(model, draft, None, 20, threads, 3, compile=True, tokens=12) as engine:
            drafting, checking = engine.engines[1], engine.engines[0]
            expected = "torch.compile" if not exported else "compiled" if run == 0 else "loaded"
            assert drafting.step_source == checking.step_source == expected
        compiles = compile_ledger._ledger()["compile"]
        assert {key: entry["seconds"] for key, entry in compiles.items()} == {
            _model_key(draft): 40.0, _model_key(model, _verify_kind(4)): 40.0}


@pytest.mark.parametrize("exported", [True, False], ids=["aot-inductor", "torch.compile"])
def test_a_served_draft_engine_records_what_it_compiled_under_each_step(tiny_checkpoint, fake_compile, monkeypatch,
                                                                        exported):
    """`serve --draft_model` (`SpeculativeBatchEngine` with `compile`, as `litllm.serve.server._start_engine` makes
    it): its batched step, the draft's one-token step, the model's verify step and the draft's step of k + 1 tokens
    each record what compiling them took (the batched one's first run included where torch.compile makes it), under
    their model and step, as `generate --draft_model` records its own; an engine that loads them records nothing.
    Before, none of them was recorded (the slot steps did not say whether they were compiled or loaded)."""
    from litllm import compile_ledger
    from litllm.compile_decode import _verify_kind
    from litllm.compile_ledger import _model_key
    from litllm.speculative import SpeculativeBatchEngine

    ledger, clock = fake_compile
    clock.step, clock.compile = 0.0, 40.0  # (the fake AOTInductor compile: 40 s)
    if not exported:  # the batched step: torch.compile's, compiled at its first run (the slot steps stay eager)
        compile_lazily(monkeypatch, clock, 30.0)
    model, draft, threads = _speculative_pair(tiny_checkpoint)
    verify = _verify_kind(4)
    expected = {_model_key(model): 40.0, _model_key(draft): 40.0, _model_key(model, verify): 40.0,
                _model_key(draft, verify): 40.0} if exported else {_model_key(model): 30.0}
    for run in range(2):
        ledger.unlink(missing_ok=True)
        with SpeculativeBatchEngine(model, draft, None, 2, 20, num_speculative_tokens=3, threads=threads,
                                    compile=True) as engine:
            assert engine.step_source == ("torch.compile" if not exported else "compiled" if run == 0 else "loaded")
        compiles = compile_ledger._ledger()["compile"]
        assert {key: entry["seconds"] for key, entry in compiles.items()} == (
            expected if run == 0 or not exported else {})


def test_a_compiled_rollout_records_its_compile_and_a_loaded_one_nothing(tiny_checkpoint, fake_compile):
    """GRPO's rollouts (`litllm.grpo.rollout.rollout_engine`): the policy's decode step that a rollout compiled
    records its seconds as that model's decode step; the next rollout loads it and records nothing. Before, a
    rollout's compile was not recorded."""
    from litllm import compile_ledger
    from litllm.compile_ledger import _model_key
    from litllm.grpo.rollout import rollout_engine
    from litllm.model import GPT

    ledger, clock = fake_compile
    clock.step, clock.compile = 0.0, 40.0
    policy = GPT.from_checkpoint(tiny_checkpoint)
    for run in range(2):
        ledger.unlink(missing_ok=True)
        with rollout_engine(policy, 4, 20, True) as engine:
            assert engine.step_source == ("compiled" if run == 0 else "loaded")
            key = _model_key(policy)
        compiles = compile_ledger._ledger()["compile"]
        assert {k: entry["seconds"] for k, entry in compiles.items()} == ({key: 40.0} if run == 0 else {})


@pytest.mark.parametrize("eager_pick, compiled, picked", [(1, {1: 2.0, 2: 0.5}, 2), (2, {1: 0.5, 2: 2.0}, 1),
                                                          (1, {1: 0.5, 2: 0.5}, 2)],
                         ids=["second-thread-pays", "second-thread-does-not-pay", "a-tie-keeps-the-budget"])
def test_a_compiled_run_picks_its_threads_by_the_compiled_step(tiny_checkpoint, fake_compile, monkeypatch,
                                                               eager_pick, compiled, picked):
    """Whatever the eager step's pick, a compiled run decodes with the thread count its compiled step was fastest at
    (1 only where it is `min_gain` faster than torch's 2), records it, and a later load takes it from the record,
    its steps then timed no more."""
    from litllm import compile_ledger, inference
    from litllm.compile_decode import PICK_ROUNDS, decode_choices_key
    from litllm.compile_ledger import recorded_decode_choices

    ledger, clock = fake_compile
    clock.step, clock.compiled = 0.0, compiled  # a compiled step takes `compiled[threads]` seconds
    torch.set_num_threads(2)  # the budget: candidates 2 and 1
    monkeypatch.setattr(inference, "pick_decode_threads", lambda model: eager_pick)
    model, threads = inference.load_for_decoding(tiny_checkpoint, "cpu", "32-true")
    assert threads == eager_pick and model.decode_choices["threads_by"] == "eager"
    assert recorded_decode_choices(model.decode_choices["key"]) is None
    from litllm.generate import decode_engine

    with decode_engine(model, None, 1, 20, threads, True, 12) as engine:
        assert engine.step_source == "compiled" and engine.threads == picked
        # the warm-up's step at the loader's count, then one more and PICK_ROUNDS x each count timed
        assert clock.compiled_at[0] == eager_pick
        assert sorted(clock.compiled_at[1:]) == sorted([2, 1] * PICK_ROUNDS + [2])
        clock.compiled_at.clear()
        engine.add(Request([1, 2, 3], 4))
        while engine.has_unfinished:
            engine.step()
        assert clock.compiled_at == [picked] * 3  # it decodes at the pick
    assert model.decode_choices["threads"] == picked and model.decode_choices["threads_by"] == "compiled"
    assert recorded_decode_choices(model.decode_choices["key"]) == {"layout": model.decode_choices["layout"],
                                                                    "threads": picked}
    # a later engine of this model, given the loader's (eager) count, takes the pick without timing again
    clock.compiled_at.clear()
    assert runs(model, threads, 1, compile=True, tokens=3) == ["loaded"]
    assert clock.compiled_at == [picked] * 3  # its warm-up, then 2 steps

    def timed_again(*args, **kwargs):
        raise AssertionError("timed again")

    # a later process: the record, no timing of either step
    monkeypatch.setattr(inference, "pick_decode_threads", timed_again)
    monkeypatch.setattr("litllm.generate.pick_compiled_threads", timed_again)
    model, threads = inference.load_for_decoding(tiny_checkpoint, "cpu", "32-true")
    assert threads == picked and model.decode_choices["threads_by"] == "record"
    assert runs(model, threads, 1, tokens=3) == ["loaded"]
    # a record from before (threads picked on the eager step, no "threads_by") is no record: picked again
    path = ledger.parent / compile_ledger.CHOICES_FILE
    key = decode_choices_key(model)
    path.write_text(json.dumps({key: {"layout": "row-major", "threads": 1}}))
    assert recorded_decode_choices(key) is None


def test_a_steps_small_kernels_run_on_the_calling_thread():
    """`SERIAL_KERNEL_OPTIONS`: in a 2-thread CPU step, a decode step's SwiGLU product (2048 values) is a serial
    kernel, no OpenMP region (inductor's default gives it one: a fork and a barrier for a microsecond of work), while
    an attention-sized reduction (12 heads x 256 positions x 64) keeps its region; both compute what eager does."""
    from torch._inductor.utils import run_and_get_code

    from litllm.compile_decode import CPU_COMPILE_OPTIONS, ONE_ROW_COMPILE_OPTIONS, SERIAL_KERNEL_OPTIONS

    assert CPU_COMPILE_OPTIONS.items() >= SERIAL_KERNEL_OPTIONS.items() <= ONE_ROW_COMPILE_OPTIONS.items()

    def swiglu(x: torch.Tensor) -> torch.Tensor:  # (1, 1, 2 * 2048) -> (1, 1, 2048)
        gate, up = x.split(x.shape[-1] // 2, dim=-1)
        return torch.nn.functional.silu(gate) * up

    def scores(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:  # (12, 1, 64), (12, 256, 64) -> (12, 1, 256)
        return (q * k).sum(-1, keepdim=True).transpose(1, 2)

    def regions(fn, options: dict, *args) -> int:
        torch._dynamo.reset()
        compiled = torch.compile(fn, dynamic=False, options={**options, "cpp.threads": 2, "fx_graph_cache": False})
        got, code = run_and_get_code(compiled, *args)
        torch.testing.assert_close(got, fn(*args))
        return "".join(code).count("#pragma omp parallel")

    torch.manual_seed(0)
    x, q, k = torch.randn(1, 1, 4096), torch.randn(12, 1, 64), torch.randn(12, 256, 64)
    assert regions(swiglu, CPU_COMPILE_OPTIONS, x) == 0
    assert regions(swiglu, {}, x) == 1  # inductor's default
    assert regions(scores, CPU_COMPILE_OPTIONS, q, k) == 1


def test_import_bounds_openmp_spin():
    """`import litllm` before torch sets GNU OpenMP's spin count (`litllm.bound_omp_spin`: by default an idle thread
    of a CPU decode step spins ~10 ms at each barrier, which under load slows a 2-thread step 5x), unless the user
    chose a wait policy; after torch it is too late, and nothing is set."""
    from litllm import OMP_SPIN_COUNT

    def spin_count(extra_env: dict, first: str = "") -> str:
        env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
        code = f"import os; {first}import litllm; print(os.environ.get('GOMP_SPINCOUNT'))"
        proc = subprocess.run([sys.executable, "-c", code], env={**env, **extra_env}, capture_output=True, text=True,
                              timeout=120)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout.strip()

    assert spin_count({}) == OMP_SPIN_COUNT
    assert spin_count({"OMP_WAIT_POLICY": "active"}) == "None"  # the user's policy stands
    assert spin_count({"GOMP_SPINCOUNT": "50"}) == "50"
    assert spin_count({}, first="import torch; ") == "None"  # libgomp read its settings when torch loaded it


def _rows_joining_apart(model, source: str) -> None:
    """Rows that join a 2-row engine at different steps, one of them into a row freed mid-run, get the same greedy
    tokens from its compiled step (made by `source`) as from eager decoding, whose batched rows equal one row at a
    time (tests/test_generate.py)."""
    from litllm.engine import Engine
    from test_generate import _run

    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 300, (n,), generator=g).tolist() for n in (5, 9, 3)]
    tokens = {}
    for compiled in (False, True):
        # 2 rows: the third request waits until the second one's row is free
        joins = {0: [Request(prompts[0], 24)], 3: [Request(prompts[1], 8)], 5: [Request(prompts[2], 16)]}
        with Engine(model, None, 2, 64, compile=compiled) as engine:
            tokens[compiled] = _run(engine, joins)
            assert engine.step_source == source if compiled else not engine._compiled
    assert [len(t) for t in tokens[False].values()] == [24, 8, 16]
    assert tokens[True] == tokens[False]


@pytest.mark.slow
def test_the_compiled_cpu_step_decodes_the_eager_tokens_of_rows_at_own_positions(tiny_checkpoint, tmp_path,
                                                                                 monkeypatch):
    """The CPU's compiled step (AOTInductor) over rows at their own positions writes each row's keys and values at
    its position (`KVCache.update`'s index_put_, which inductor writes in place) and decodes eager decoding's tokens."""
    from litllm.model import GPT

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    _rows_joining_apart(GPT.from_checkpoint(tiny_checkpoint).eval(), "compiled")  # fp32


def test_kept_row_counts_are_faster_than_every_larger_step():
    """A step over the first rows is kept only if it beats every larger one (the step over all rows included) by
    the margin: the 134M bf16 step's CPU-ms on the AMX Xeon keep 1, 2 and 4 of 16 rows, not 8 (slower than 16)."""
    from litllm.compile_decode import kept_row_counts

    assert kept_row_counts({1: 21.0, 2: 37.0, 4: 54.0, 8: 88.0, 16: 72.0}) == [1, 2, 4]
    assert kept_row_counts({1: 10.0, 2: 10.5, 4: 30.0}) == [2]  # 1 row barely faster than 2: the 2-row step serves it
    assert kept_row_counts({1: 10.0, 2: 10.0}) == []
    assert kept_row_counts({8: 1.0}) == []


@pytest.mark.slow
def test_steps_over_the_first_rows_decode_the_eager_tokens(tiny_checkpoint, tmp_path, monkeypatch, capsys):
    """`row_steps` (serve's engine): compiled steps over the first 1 and 2 of 4 rows, which a step takes while every
    running row lies there, decode eager decoding's tokens for rows that join and leave at different steps (a row
    beyond them joining while one is there; one taking a freed row), and both are taken. Each compile says so in a
    line; a start that loads them says nothing."""
    from litllm import compile_decode
    from litllm.compile_decode import load_saved_step
    from litllm.engine import Engine
    from litllm.model import GPT
    from test_generate import _run

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(compile_decode, "kept_row_counts", lambda seconds: sorted(seconds)[:-1])  # all, untimed
    model = GPT.from_checkpoint(tiny_checkpoint).eval()
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 300, (n,), generator=g).tolist() for n in (5, 9, 3, 7)]
    tokens, steps = {}, {}
    for compiled in (False, True):
        # slot 0 alone (1 row), then slots 0-1 (2 rows), then 0-2 (all 4); the 4th request takes slot 1 once it is free
        joins = {0: [Request(prompts[0], 20)], 3: [Request(prompts[1], 6)], 6: [Request(prompts[2], 12)],
                 12: [Request(prompts[3], 10)]}
        with Engine(model, None, 4, 64, compile=compiled, row_steps=True) as engine:
            tokens[compiled] = _run(engine, joins)
            steps[compiled] = set(engine.decode_steps)
    assert [len(t) for t in tokens[False].values()] == [20, 6, 12, 10]
    assert tokens[True] == tokens[False]
    assert steps == {False: {4}, True: {1, 2, 4}}  # eager: no row steps
    notes = [line for line in capsys.readouterr().err.splitlines() if "rows once" in line]
    assert [line.split(" rows once")[0].split("the first ")[1] for line in notes] == ["1 of 4", "2 of 4"]
    # a default run that loads the saved step (`step_engine`'s `load_saved_step`) loads the saved row steps with it
    with Engine(model, None, 4, 64, row_steps=True) as engine:
        assert load_saved_step(engine) and list(engine._row_steps) == [1, 2]
    assert "rows once" not in capsys.readouterr().err


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")  # benchmarks/gpu_check.sh runs it
def test_the_cuda_graph_step_decodes_the_eager_tokens_on_gpu(tiny_checkpoint):
    """On CUDA the compiled step is captured in a CUDA graph (`compile_step`: `mode="reduce-overhead"`, the KV cache
    and the step's input buffers at fixed addresses): rows that join at different steps, one of them into a row freed
    mid-run, get eager decoding's greedy tokens."""
    from litllm.model import GPT

    _rows_joining_apart(GPT.from_checkpoint(tiny_checkpoint, device="cuda").eval(), "torch.compile")  # fp32


def test_a_step_over_tensor_subclass_weights_is_not_saved_where_it_could_not_load(monkeypatch, tmp_path, capsys):
    """torchao.int4wo's CPU weights are tensor subclasses, whose inner tensors AOTInductor keeps as unnamed constants
    that no running model's tensors can be handed to: such a step is not saved (it went to torch.compile after saving
    a step that never loaded, so every later run, short ones too, compiled it again), the engine decodes through
    torch.compile (`compile_engine_step`, which compiles it at its first call), and the compile's note says so."""
    pytest.importorskip("torchao")
    from conftest import tiny_config
    from litllm.compile_decode import _load_step, _step_file, compile_engine_step, saved_step_length, steps_folder
    from litllm.compile_ledger import EagerAccount, note_compile
    from litllm.engine import Engine
    from litllm.model import GPT
    from litllm.quantize import quantize_model

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("LITLLM_INT4_ROWS", "0")  # torchao's own layer (its subclass), not litllm's int4 op where it runs
    torch.manual_seed(0)
    config = tiny_config(n_embd=128, n_head=4, n_query_groups=4, intermediate_size=256, n_layer=1)
    model = quantize_model(GPT(config).to(torch.bfloat16).eval(), "torchao.int4wo", "cpu")
    assert type(model.blocks[0].attn.qkv.weight) not in (torch.Tensor, torch.nn.Parameter)  # a torchao subclass
    engine = Engine(model, None, 1, 64, threads=1)
    compile_engine_step(engine)
    path = steps_folder(model) / _step_file(1, 64)
    assert not path.exists() or _load_step(path, engine) is not None  # a saved step loads for the model it was for
    assert engine.step_source == "torch.compile"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"saved by an earlier version")  # such a file never fits: not found, not loaded, no note
    assert saved_step_length(model, 1, 64) is None and _load_step(path, engine) is None
    note_compile(model)
    assert "it is not saved here: later runs compile it again" in capsys.readouterr().err
    assert EagerAccount(model, 1, 64).unsaved  # a short run compiles only where it pays for the compile alone


FAMILIES = {
    "gqa": {},
    "mha": dict(n_query_groups=4),  # one query head per key head: compiled attention as products and sums
    "window_softcap": dict(sliding_window_size=6, sliding_window_period=2, attention_logit_softcapping=5.0),
    "mla": dict(n_embd=64, n_head=4, n_query_groups=4, head_size=24, kv_lora_rank=16, qk_rope_head_dim=8,
                v_head_dim=12, intermediate_size=96),
}


def _stale_then_nan(engine, attended: int) -> None:
    """Fill `engine`'s KV cache with finite values (what earlier requests leave) up to position `attended` and NaN from
    there: a step that reads a position past `attended` returns NaN logits (a masked NaN value still meets its zero
    probability: 0 * NaN)."""
    g = torch.Generator().manual_seed(1)
    for cache in engine._caches:
        for t in (cache.k, cache.v):
            t[:, :, :attended] = torch.randn(t[:, :, :attended].shape, generator=g)
            t[:, :, attended:] = float("nan")


@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_a_saved_step_attends_over_the_filled_positions_of_rows_at_own_positions(family, tmp_path, monkeypatch):
    """The saved step (AOTInductor, the attended length a dynamic dimension) of two rows at their own positions
    computes eager decoding's logits over the first `kv_len` positions, and reads no position past
    `attended_length(kv_len)`: there the cache holds NaN, which the whole-cache step (kv_len None) does read. A second
    engine loads the saved step and serves other lengths (crossing `KV_BUCKET` boundaries) alike. Families: grouped
    queries, one query head per key head, sliding windows with softcapped scores (their own mask), MLA (a latent
    cache)."""
    from conftest import tiny_config

    from litllm.compile_decode import KV_BUCKET, attended_length
    from litllm.engine import Engine
    from litllm.model import GPT

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    torch.manual_seed(0)
    model = GPT(tiny_config(block_size=256, **FAMILIES[family])).eval()
    compiled = Engine(model, None, 2, 256, compile=True)
    assert compiled.step_source == "compiled"
    loaded = Engine(model, None, 2, 256, compile=True)
    assert loaded.step_source == "loaded"
    tokens = torch.tensor([[5], [7]])
    for engine, positions in ((compiled, (70, 130)), (loaded, (3, 20)), (loaded, (KV_BUCKET - 1, 190))):
        kv_len = max(positions) + 1
        attended = attended_length(kv_len, 256)
        assert attended % KV_BUCKET == 0 and kv_len <= attended < 256
        _stale_then_nan(engine, attended)
        pos = torch.tensor(positions)[:, None]  # (2, 1)
        with torch.inference_mode():
            logits = engine._decode(tokens, pos, kv_len)
            engine._set_caches(engine._caches)
            expected = model.decode(tokens, input_pos=pos, kv_len=kv_len)[:, -1, : engine.vocab_size]
            assert logits.isfinite().all()
            torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)
            assert engine._decode(tokens, pos, None).isnan().all()  # the whole cache: the NaN is read


@pytest.mark.slow
def test_compiled_greedy_tokens_cross_attended_length_buckets_as_eager(tiny_checkpoint, tmp_path, monkeypatch):
    """Greedy decoding with the compiled step from a prompt of 40 tokens to position 100 of the tiny model's
    128-position window (the attended length grows from 64 to 128 on the way) gives eager decoding's tokens."""
    from litllm.engine import Engine
    from litllm.model import GPT

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    model = GPT.from_checkpoint(tiny_checkpoint).eval()
    prompt = torch.randint(0, 300, (40,), generator=torch.Generator().manual_seed(0)).tolist()
    tokens = {compile: greedy_tokens(Engine(model, None, 1, 128, compile=compile), prompt, 60)
              for compile in (False, True)}
    assert len(tokens[False]) == 60 and tokens[True] == tokens[False]
