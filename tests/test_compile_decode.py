"""The compiled decode step: when it is on by default, that it decodes what eager decoding does, and that
its compile cache makes a second process start from cached kernels."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from litllm.compile_decode import (CHOICES_FILE, COMPILE_ENV, compile_cache_dir, compiled_length,
                                   record_decode_choices, should_compile)
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
    record_decode_choices(key, "column-major", 1)

    def timed_again(*args, **kwargs):
        raise AssertionError("the recorded choice was not used")

    monkeypatch.setattr(inference, "pick_decode_threads", timed_again)
    model, threads = inference.load_for_decoding(tiny_checkpoint, "cpu", "32-true")
    assert threads == 1 and model.decode_choices == {"key": key, "layout": "column-major", "threads": 1}
    assert not model.blocks[0].attn.qkv.weight.is_contiguous()  # laid out as recorded (a transposed view)


def test_a_model_over_several_devices_decodes_eagerly_by_default(tiny_checkpoint, monkeypatch):
    from litllm.generate import decode_engine
    from litllm.model import GPT

    monkeypatch.setenv(COMPILE_ENV, "1")  # the default would compile
    model = GPT.from_checkpoint(tiny_checkpoint).eval()
    model.block_devices = ["cpu", "cpu"]  # as `--strategy sequential` marks it (tensor parallel: `tp_channel`)
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
# a fresh process: `litllm generate` with the default --compile (on: $LITLLM_COMPILE=1 stands for a long
# generation), reporting the tokens and inductor's FX graph cache hits/misses of its compile
CHILD = SPY + """
import json, sys
from torch._dynamo.utils import counters
from litllm.generate import generate
generate(sys.argv[1], "Hello", max_new_tokens=12, temperature=0.0)
# a hit of AOTAutograd's cache (which sits in front of inductor's) serves the compiled graph without an FX lookup
print(json.dumps({"tokens": tokens, "counters": {k: dict(v) for k, v in counters.items() if "cache" in str(dict(v))},
                  "hit": counters["inductor"]["fxgraph_cache_hit"] + counters["aot_autograd"]["autograd_cache_hit"],
                  "miss": counters["inductor"]["fxgraph_cache_miss"]}))
"""


@pytest.mark.slow
def test_default_compiled_decode_equals_eager_and_second_process_hits_the_cache(tiny_checkpoint, tmp_path):
    # no thread pin: the first process records the thread count and weight layout it picked by timing (which the
    # compiled kernels depend on), and the second takes them from there
    env = {**os.environ, COMPILE_ENV: "1", "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "cache")}

    def run() -> tuple[dict, str]:
        proc = subprocess.run([sys.executable, "-c", CHILD, str(tiny_checkpoint)], env=env, capture_output=True,
                              text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout.strip().splitlines()[-1]), proc.stderr

    eager = {}
    exec(SPY, eager)  # the same spy in this process, around an eager generate
    try:
        from litllm.generate import generate

        generate(tiny_checkpoint, "Hello", max_new_tokens=12, temperature=0.0, compile=False)
    finally:
        eager["Engine"].step = eager["step"]
    first, err = run()
    assert "Compiled the decode step" in err and str(tmp_path / "cache") in err
    assert first["tokens"][2:] == eager["tokens"]  # after the 2-token warm-up: the same greedy tokens
    assert first["miss"] >= 1 and first["hit"] == 0  # a cold cache: compiled
    assert (tmp_path / "cache" / CHOICES_FILE).is_file()  # the loader's picks, for the next process
    second, _ = run()
    assert second["tokens"] == first["tokens"]
    assert second["hit"] >= 1 and second["miss"] == 0, second["counters"]  # every kernel from the cache
