"""`litllm serve --draft_model`: greedy answers equal a draft-less server's (the official `openai` client, several
concurrent clients, streamed and not, chat and completions); a request the draft path can't take (logprobs)
still works; the acceptance rate is in /metrics; a draft of another vocabulary, or with --devices 2, is refused
in one line."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from test_serve import KEY, Server

safetensors_torch = pytest.importorskip("safetensors.torch")


@pytest.fixture(scope="module")
def servers(tiny_checkpoint, tmp_path_factory):
    """(a draft-less server, one whose draft is a noisy copy of the model: it agrees often, not always)."""
    draft = tmp_path_factory.mktemp("draft") / "draft"
    shutil.copytree(tiny_checkpoint, draft)
    weights = draft / "lit_model.safetensors"
    state = safetensors_torch.load_file(weights)
    g = torch.Generator().manual_seed(1)
    state = {k: v + torch.randn(v.shape, generator=g) * 0.05 * v.abs().mean() if v.is_floating_point() else v
             for k, v in state.items()}
    safetensors_torch.save_file(state, weights)
    log = tmp_path_factory.mktemp("serve_spec")
    flags = ("--max_batch_size", "3", "--api_key", KEY, "--compile", "false")
    plain = Server(tiny_checkpoint, log / "plain.log", *flags)
    speculating = Server(tiny_checkpoint, log / "draft.log", *flags, "--draft_model", str(draft),
                         "--num_speculative_tokens", "3")
    yield plain, speculating
    for s in (plain, speculating):
        s.stop(signal.SIGKILL if s.proc.poll() is None else signal.SIGTERM)


def _answers(server, model_id: str) -> list:
    from conftest import SAMPLE_TEXT

    client = server.client()

    def ask(i):
        prompt, n = SAMPLE_TEXT[: 5 + 17 * i], 14 + 4 * i
        time.sleep(0.05 * (i % 3))
        if i == 4:  # not the draft path: the other rows take plain steps while it runs
            choice = client.completions.create(model=model_id, prompt=prompt, max_tokens=n, temperature=0,
                                               logprobs=2).choices[0]
            return choice.text, choice.logprobs.tokens
        if i % 3 == 1:
            chunks = client.completions.create(model=model_id, prompt=prompt, max_tokens=n, temperature=0, stream=True)
            return "".join(c.choices[0].text for c in chunks)
        if i % 3 == 2:
            messages = [{"role": "user", "content": prompt}]
            return client.chat.completions.create(model=model_id, messages=messages, max_tokens=n,
                                                  temperature=0).choices[0].message.content
        return client.completions.create(model=model_id, prompt=prompt, max_tokens=n, temperature=0).choices[0].text

    with ThreadPoolExecutor(6) as pool:
        return list(pool.map(ask, range(6)))


def test_greedy_answers_equal_the_draftless_server(servers, tiny_checkpoint):
    plain, speculating = servers
    expected = _answers(plain, tiny_checkpoint.name)
    assert _answers(speculating, tiny_checkpoint.name) == expected
    assert sum(bool(a) for a in expected) >= 4 and expected[4][1]  # texts (one may stop at once), logprobs
    # one client alone: every step speculates
    client = speculating.client()
    alone = client.completions.create(model=tiny_checkpoint.name, prompt="Hello", max_tokens=40, temperature=0)
    assert alone.choices[0].text == plain.client().completions.create(
        model=tiny_checkpoint.name, prompt="Hello", max_tokens=40, temperature=0).choices[0].text
    metrics = {line.split()[0]: float(line.split()[1]) for line in speculating.get("/metrics").text.splitlines()
               if line.startswith("litllm_spec_decode")}
    assert metrics["litllm_spec_decode_draft_tokens"] >= 30
    assert 0.0 < metrics["litllm_spec_decode_acceptance_ratio"] < 1.0
    assert "litllm_spec_decode" not in plain.get("/metrics").text


@pytest.mark.parametrize("flags, message", [
    (("--draft_model", "OTHER"), r"error: --draft_model .*other: its vocabulary \(.*\) differs from the model's"),
    (("--draft_model", "SELF", "--devices", "2"), "error: --draft_model with --devices > 1: .* not supported"),
])
def test_bad_drafts_are_refused_in_one_line(tiny_checkpoint, tmp_path, flags, message):
    import re

    from conftest import make_converted_checkpoint

    other = make_converted_checkpoint(tmp_path / "other", vocab_size=300) if "OTHER" in flags else None
    flags = [str(other) if f == "OTHER" else str(tiny_checkpoint) if f == "SELF" else f for f in flags]
    run = subprocess.run([sys.executable, "-m", "litllm", "serve", str(tiny_checkpoint), "--port", "0", *flags],
                         capture_output=True, text=True, timeout=180)
    assert run.returncode != 0
    errors = [line for line in run.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and re.search(message, errors[0]), run.stderr[-2000:]
    assert "Traceback" not in run.stderr
