"""`litllm evaluate` / `evaluate_perplexity` against lm-eval's Hugging Face backend and transformers.

The oracle: lm-eval's own `HFLM` runs the same tiny model in transformers on the same local tasks
(multiple choice, generate_until, rolling loglikelihood); every request's answer must agree.
Perplexity is checked against transformers log-probabilities computed token by token.
"""

from __future__ import annotations

import os

# before lm_eval/datasets are imported: tasks load from local files only
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["HF_HUB_OFFLINE"] = "1"

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from litllm.errors import LitLLMError

MC_TASK, GEN_TASK, PPL_TASK = "litllm_test_mc", "litllm_test_gen", "litllm_test_ppl"
TOL = 1e-4


# ---------------------------------------------------------------------- fixtures
def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")


@pytest.fixture(scope="module")
def tasks_dir(tmp_path_factory) -> Path:
    """Three lm-eval tasks in YAML over local JSONL files: multiple choice, generation, rolling loglikelihood."""
    folder = tmp_path_factory.mktemp("eval_tasks")
    pairs = [(1, 2), (3, 4), (5, 6), (7, 8), (2, 2), (9, 1)]
    _write_jsonl(folder / "mc.jsonl", [
        {"question": f"What is {a} plus {b}?", "choices": [str(a + b), f" {a + b + 1}", f"{a * b} apples", "fox"],
         "answer": i % 4}
        for i, (a, b) in enumerate(pairs)
    ])
    _write_jsonl(folder / "gen.jsonl", [
        {"question": q, "answer": a} for q, a in [
            ("The quick brown", "fox"), ("def fibonacci(n):", "return"), ("Numbers: 12345", "67.89"),
            ("Pack my box", "with"), ("unicode: café,", "naïve"), ("Instruction: Write a haiku", "about"),
        ]
    ])
    _write_jsonl(folder / "ppl.jsonl", [
        {"text": "The quick brown fox jumps over the lazy dog. " * k + "Pack my box with five dozen liquor jugs!"}
        for k in (1, 3, 6)
    ])
    common = "dataset_path: json\ntest_split: test\nfewshot_split: test\n"
    (folder / "mc.yaml").write_text(
        f"task: {MC_TASK}\n{common}dataset_kwargs:\n  data_files:\n    test: {folder / 'mc.jsonl'}\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "Question: {{question}}\\nAnswer:"\n'
        "doc_to_choice: choices\ndoc_to_target: answer\n"
        "metric_list:\n"
        "  - {metric: acc, aggregation: mean, higher_is_better: true}\n"
        "  - {metric: acc_norm, aggregation: mean, higher_is_better: true}\n"
    )
    (folder / "gen.yaml").write_text(
        f"task: {GEN_TASK}\n{common}dataset_kwargs:\n  data_files:\n    test: {folder / 'gen.jsonl'}\n"
        "output_type: generate_until\n"
        'doc_to_text: "{{question}}"\ndoc_to_target: "{{answer}}"\n'
        "generation_kwargs:\n  until: [\"\\n\", \".\"]\n  max_gen_toks: 12\n  do_sample: false\n"
        "metric_list:\n  - {metric: exact_match, aggregation: mean, higher_is_better: true}\n"
    )
    (folder / "ppl.yaml").write_text(
        f"task: {PPL_TASK}\n{common}dataset_kwargs:\n  data_files:\n    test: {folder / 'ppl.jsonl'}\n"
        "output_type: loglikelihood_rolling\n"
        'doc_to_text: ""\ndoc_to_target: "{{text}}"\n'
        "metric_list:\n"
        "  - {metric: word_perplexity, aggregation: weighted_perplexity, higher_is_better: false}\n"
        "  - {metric: bits_per_byte, aggregation: bits_per_byte, higher_is_better: false}\n"
    )
    return folder


@pytest.fixture(scope="module")
def local_tasks(tasks_dir):
    """A task index of only the local tasks (the built-in index takes seconds to build)."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(tasks_dir), include_defaults=False)


def _edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            data.pop(key, None)
        else:
            data[key] = value
    path.write_text(json.dumps(data))


@pytest.fixture(scope="module")
def no_bos_checkpoint(tiny_checkpoint, tmp_path_factory) -> Path:
    """The tiny model with a tokenizer that has no BOS (Qwen/GPT-2 style): lm-eval falls back to EOS.

    generation_config.json keeps a bos_token_id (as Qwen's does), which transformers' tokenizer ignores.
    """
    folder = tmp_path_factory.mktemp("no_bos") / "model"
    shutil.copytree(tiny_checkpoint, folder)
    _edit_json(folder / "tokenizer.json", post_processor=None)
    _edit_json(folder / "tokenizer_config.json", bos_token=None, add_bos_token=False)
    return folder


@pytest.fixture(scope="module")
def chat_checkpoint(tiny_checkpoint, tmp_path_factory) -> Path:
    """The tiny model with a ChatML chat template in tokenizer_config.json."""
    folder = tmp_path_factory.mktemp("chat") / "model"
    shutil.copytree(tiny_checkpoint, folder)
    template = (
        "{{ bos_token }}{% for m in messages %}"
        "{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    )
    _edit_json(folder / "tokenizer_config.json", chat_template=template)
    return folder


# ---------------------------------------------------------------------- helpers
def _hflm(folder: Path, batch_size: int, max_length=None):
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=str(folder), batch_size=batch_size, device="cpu", dtype="float32", max_length=max_length)


def _litlm(folder: Path, batch_size: int, max_length=None):
    from litllm.eval_lm import LitLLMLM
    from litllm.evaluate import load_model

    model, tokenizer = load_model(folder, "cpu", "32-true")
    return LitLLMLM(model, tokenizer, batch_size=batch_size, max_length=max_length, checkpoint_dir=folder)


def _run(lm, manager, tasks, **kwargs) -> dict:
    import lm_eval

    return lm_eval.simple_evaluate(
        model=lm, tasks=tasks, task_manager=manager, log_samples=True, bootstrap_iters=0, **kwargs
    )


def _responses(results: dict, task: str) -> list:
    """Per document, the raw answer to each of its requests."""
    samples = sorted(results["samples"][task], key=lambda s: s["doc_id"])
    return [[r[0] for r in s["resps"]] for s in samples]


def _assert_same_answers(expected: dict, actual: dict, tasks: list[str], tol: float) -> None:
    for task in tasks:
        want, got = _responses(expected, task), _responses(actual, task)
        assert len(want) == len(got) > 0, task
        for doc_want, doc_got in zip(want, got):
            for w, g in zip(doc_want, doc_got, strict=True):
                if isinstance(w, str):  # generate_until
                    assert g == w, task
                elif isinstance(w, float):  # loglikelihood_rolling
                    assert g == pytest.approx(w, abs=tol), task
                else:  # loglikelihood: (logprob, is_greedy)
                    assert g[0] == pytest.approx(w[0], abs=tol), task
                    assert g[1] == w[1], task


# ---------------------------------------------------------------------- parity with lm-eval's HF backend
def test_answers_match_hflm_and_batch_sizes_agree(tiny_checkpoint, local_tasks):
    """Every request of the three tasks, 1-shot, with a context short enough to truncate on the left."""
    from litllm.tokenizer import Tokenizer

    tasks, max_length = [MC_TASK, GEN_TASK, PPL_TASK], 40
    lines = (Path(local_tasks.include_path) / "ppl.jsonl").read_text().splitlines()
    docs = [json.loads(line)["text"] for line in lines]
    assert len(Tokenizer(tiny_checkpoint).encode(docs[-1])) > 3 * max_length  # several rolling windows

    hf = _run(_hflm(tiny_checkpoint, 4, max_length), local_tasks, tasks, num_fewshot=1)
    lit = {bs: _run(_litlm(tiny_checkpoint, bs, max_length), local_tasks, tasks, num_fewshot=1) for bs in (1, 8)}
    for bs in (1, 8):
        _assert_same_answers(hf, lit[bs], tasks, TOL)
        for task in tasks:
            for metric, value in hf["results"][task].items():
                if isinstance(value, float):
                    assert lit[bs]["results"][task][metric] == pytest.approx(value, rel=1e-4), (task, metric)
    _assert_same_answers(lit[1], lit[8], tasks, 1e-5)


def test_answers_match_hflm_without_bos(no_bos_checkpoint, local_tasks):
    from litllm.tokenizer import Tokenizer

    tokenizer = Tokenizer(no_bos_checkpoint)
    assert tokenizer.encode("hello")[0] != 0  # no BOS added
    tasks = [MC_TASK, GEN_TASK, PPL_TASK]
    hf = _run(_hflm(no_bos_checkpoint, 4), local_tasks, tasks)
    lit = _run(_litlm(no_bos_checkpoint, 8), local_tasks, tasks)
    _assert_same_answers(hf, lit, tasks, TOL)


def test_chat_template_prompts_match_hflm(chat_checkpoint, local_tasks):
    tasks = [MC_TASK, GEN_TASK]
    hf = _run(_hflm(chat_checkpoint, 4), local_tasks, tasks, num_fewshot=1, apply_chat_template=True)
    lit = _run(_litlm(chat_checkpoint, 8), local_tasks, tasks, num_fewshot=1, apply_chat_template=True)
    # the prompts themselves are identical text...
    for task in tasks:
        for want, got in zip(sorted(hf["samples"][task], key=lambda s: s["doc_id"]),
                             sorted(lit["samples"][task], key=lambda s: s["doc_id"])):
            assert got["arguments"] == want["arguments"]
            assert "<|im_start|>assistant" in str(got["arguments"])
    # ...and so are the answers
    _assert_same_answers(hf, lit, tasks, TOL)


def test_generation_stops_at_stop_strings_like_hflm(tiny_checkpoint):
    """Stop strings picked from the middle of each unstopped generation cut both backends at the same place."""
    from lm_eval.api.instance import Instance

    contexts = ["The quick brown", "def fibonacci(n):", "Numbers: 12345", "café"]

    def requests(until: list[str]):
        kwargs = {"until": until, "max_gen_toks": 12, "do_sample": False}
        return [Instance("generate_until", {}, (c, dict(kwargs)), i) for i, c in enumerate(contexts)]

    hf, lit = _hflm(tiny_checkpoint, 4), _litlm(tiny_checkpoint, 4)
    free = hf.generate_until(requests([]))
    assert lit.generate_until(requests([])) == free
    until = sorted({text[4:6] for text in free if text[4:6].strip()})
    assert len(until) >= 2
    calls = []
    hook = lit.model.register_forward_hook(lambda *_: calls.append(1))
    stopped = lit.generate_until(requests(until))
    hook.remove()
    assert stopped == hf.generate_until(requests(until))
    for text, cut in zip(free, stopped):
        first = min((text.index(s) for s in until if s in text), default=len(text))
        assert cut == text[:first]
    # every row hit a stop string early: decoding stopped before 12 tokens (1 prefill + 11 steps)
    assert all(len(cut) < len(text) for cut, text in zip(stopped, free))
    assert len(calls) < 12


# ---------------------------------------------------------------------- the command
def test_evaluate_command_writes_results_and_prints_table(tiny_checkpoint, tasks_dir, tmp_path, capfd, monkeypatch):
    from litllm.evaluate import evaluate

    monkeypatch.chdir(tmp_path)  # outside a git checkout, where lm-eval's `git describe` complains
    out = tmp_path / "out"
    results = evaluate(tiny_checkpoint, tasks=f"{MC_TASK},{PPL_TASK}", include_path=tasks_dir, out_dir=out,
                       batch_size=4, limit=4, device="cpu", precision="32-true", log_samples=True)
    written = json.loads((out / "results.json").read_text())
    assert set(written["results"]) == {MC_TASK, PPL_TASK}
    assert written["results"][MC_TASK]["acc,none"] == results["results"][MC_TASK]["acc,none"]
    assert written["results"][MC_TASK]["sample_len"] == 4
    assert written["config"]["model"] == str(tiny_checkpoint)
    assert "samples" not in written
    assert len((out / f"samples_{MC_TASK}.jsonl").read_text().splitlines()) == 4
    printed, errors = capfd.readouterr()
    assert "|" in printed and MC_TASK in printed and "word_perplexity" in printed
    assert "fatal:" not in errors, errors
    assert not list(out.glob(".*tmp*"))


def test_tasks_without_value_lists_tasks(tiny_checkpoint, tasks_dir, capsys):
    from litllm.__main__ import main

    main(["evaluate", str(tiny_checkpoint), "--include_path", str(tasks_dir), "--tasks"])
    names = capsys.readouterr().out.split()
    assert {MC_TASK, GEN_TASK, PPL_TASK, "hellaswag"} <= set(names)


def test_unknown_task_names_close_matches(tiny_checkpoint, tasks_dir, tmp_path, capsys):
    from litllm.__main__ import main

    with pytest.raises(SystemExit) as exit_info:
        main(["evaluate", str(tiny_checkpoint), "--include_path", str(tasks_dir), "--tasks", "litllm_test_mcq",
              "--out_dir", str(tmp_path / "out")])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --tasks: unknown task 'litllm_test_mcq'") and MC_TASK in err
    assert len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists()


def _cli(*args) -> subprocess.CompletedProcess:
    """`litllm ARGS` offline: in this process when it is offline (conftest), else a `python -m litllm` subprocess."""
    from conftest import litllm_in_process, offline_here

    if offline_here():
        return litllm_in_process(args)
    env = dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "litllm", *map(str, args)], capture_output=True, text=True, env=env)


def test_bad_input_exits_nonzero_with_one_line(tiny_checkpoint, tmp_path):
    hf_only = tmp_path / "hf_only"
    hf_only.mkdir()
    shutil.copy(tiny_checkpoint / "config.json", hf_only)
    cases = [
        (["evaluate", hf_only, "--tasks", "hellaswag"], "convert_to_litllm"),
        (["evaluate", tiny_checkpoint, "--tasks", "hellaswag", "--limit", "0"], "--limit"),
        (["evaluate_perplexity", tiny_checkpoint, "--data", tmp_path / "missing.txt"], "not found"),
    ]
    for args, expected in cases:
        proc = _cli(*args, "--out_dir", tmp_path / "out")
        assert proc.returncode == 1, proc.stderr
        assert proc.stderr.startswith("error: ") and expected in proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert not (tmp_path / "out").exists()


def test_task_data_that_cannot_be_fetched_is_one_line(tiny_checkpoint, tmp_path):
    """Offline, hellaswag's data set can't be downloaded: one line naming the task and both remedies."""
    proc = _cli("evaluate", tiny_checkpoint, "--tasks", "hellaswag", "--device", "cpu", "--out_dir", tmp_path / "out")
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    error = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(error) == 1, proc.stderr
    assert error[0].startswith("error: --tasks hellaswag: ") and "could not be loaded" in error[0]
    assert "--include_path" in error[0] and "internet" in error[0]
    assert not (tmp_path / "out").exists()  # no results.json


def test_perplexity_data_that_cannot_be_read_is_one_line(tiny_checkpoint, tmp_path):
    (tmp_path / "binary.txt").write_bytes(b"\xff\xfe\x00 not text")
    unreadable = tmp_path / "locked.jsonl"
    unreadable.write_text('{"text": "hello"}\n')
    cases = [(tmp_path / "missing.jsonl", "file or folder not found"), (tmp_path / "binary.txt", "not UTF-8 text")]
    if os.geteuid() != 0:  # root reads anything
        unreadable.chmod(0)
        cases.append((unreadable, "can't read it"))
    for data, expected in cases:
        proc = _cli("evaluate_perplexity", tiny_checkpoint, "--data", data, "--out_dir", tmp_path / "out")
        assert proc.returncode == 1, proc.stderr
        assert "Traceback" not in proc.stderr + proc.stdout
        assert proc.stderr.startswith(f"error: --data {data}: ") and expected in proc.stderr, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert not (tmp_path / "out").exists()


def test_evaluate_rejects_bad_arguments(tiny_checkpoint, tasks_dir, tmp_path):
    from litllm.evaluate import evaluate

    for kwargs, message in [
        (dict(limit=-1), "--limit"),
        (dict(limit=2.5), "--limit"),
        (dict(batch_size=0), "--batch_size"),
        (dict(precision="bf16-mixed"), "--precision"),
        (dict(max_length=10_000), "max_length"),
        (dict(apply_chat_template=True), "chat template"),
    ]:
        with pytest.raises(LitLLMError, match=message):
            evaluate(tiny_checkpoint, tasks=MC_TASK, include_path=tasks_dir, out_dir=tmp_path / "out",
                     device="cpu", **kwargs)
    with pytest.raises(LitLLMError, match="include_path"):
        evaluate(tiny_checkpoint, tasks=MC_TASK, include_path=tmp_path / "nowhere")
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------- perplexity
def _hf_token_logprobs(folder: Path, tokens: list[int], contexts: dict[int, int]) -> float:
    """Sum of log P(tokens[t] | tokens[contexts[t]:t]) under transformers, one forward per token."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    total = 0.0
    with torch.no_grad():
        for t, begin in contexts.items():
            logits = model(torch.tensor([tokens[begin:t]])).logits[0, -1].float()
            total += torch.log_softmax(logits, -1)[tokens[t]].item()
    return total


def test_sliding_windows_score_every_token_once():
    from litllm.evaluate import sliding_windows

    cases = [(50, 1, 16, 8), (50, 1, 16, 16), (17, 1, 16, 5), (5, 1, 16, 8), (60, 20, 16, 3)]
    for n, first, max_length, stride in cases:
        tokens = list(range(n))
        scored = []
        for context, continuation in sliding_windows(tokens, first, max_length, stride):
            model_input = (context + continuation)[:-1]
            assert len(model_input) <= max_length
            assert model_input == tokens[model_input[0] : model_input[0] + len(model_input)]
            assert model_input[0] % stride == 0  # windows start every `stride` tokens
            for t in continuation:
                # the first window predicting t: t - max_length <= start, i.e. at least max_length - stride context
                assert t - model_input[0] >= min(t, max_length - stride + 1)
            scored += continuation
        assert scored == tokens[first:]


def test_perplexity_matches_transformers(tiny_checkpoint, tmp_path, capsys):
    from litllm.evaluate import evaluate_perplexity
    from litllm.tokenizer import Tokenizer

    data = tmp_path / "data"
    (data / "sub").mkdir(parents=True)
    texts = ["The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs!",
             "def fibonacci(n):\n    return n", "café, naïve, 東京 🙂"]
    (data / "a.txt").write_text(texts[0], encoding="utf-8")
    _write_jsonl(data / "sub" / "b.jsonl", [{"text": texts[1]}, {"text": texts[2]}])
    max_length, stride = 16, 6
    report = evaluate_perplexity(tiny_checkpoint, data=data, max_length=max_length, stride=stride, batch_size=3,
                                 device="cpu", precision="32-true", out_dir=tmp_path / "out")
    assert json.loads((tmp_path / "out" / "perplexity.json").read_text()) == report

    tokenizer = Tokenizer(tiny_checkpoint)
    expected_nll, n_tokens = 0.0, 0
    for text in texts:
        tokens = [tokenizer.bos_id] + tokenizer.encode(text, bos=False).tolist()
        # token t is read after the window starting at the first multiple of `stride` >= t - max_length
        contexts = {t: max(0, math.ceil((t - max_length) / stride)) * stride for t in range(1, len(tokens))}
        expected_nll -= _hf_token_logprobs(tiny_checkpoint, tokens, contexts)
        n_tokens += len(tokens) - 1
    assert len(tokenizer.encode(texts[0])) > 2 * max_length
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    assert (report["documents"], report["tokens"], report["bytes"]) == (3, n_tokens, n_bytes)
    assert report["nll"] == pytest.approx(expected_nll, abs=1e-3)
    assert report["perplexity"] == pytest.approx(math.exp(expected_nll / n_tokens), rel=1e-5)
    assert report["bits_per_byte"] == pytest.approx(expected_nll / math.log(2) / n_bytes, rel=1e-5)
    assert set(report["sources"]) == {str(data / "a.txt"), str(data / "sub" / "b.jsonl")}
    assert "perplexity" in capsys.readouterr().out


def test_perplexity_of_instruction_records_scores_the_response(tiny_checkpoint, tmp_path):
    from litllm.evaluate import evaluate_perplexity
    from litllm.prompts import PromptStyle
    from litllm.tokenizer import Tokenizer

    records = [{"instruction": "Name a fox.", "input": "", "output": "The quick brown fox."},
               {"instruction": "Add.", "input": "1 + 2", "output": "3"}]
    (tmp_path / "data.json").write_text(json.dumps(records))
    report = evaluate_perplexity(tiny_checkpoint, data=tmp_path / "data.json", device="cpu",
                                 precision="32-true", out_dir=tmp_path / "out")

    style, tokenizer = PromptStyle.from_checkpoint(tiny_checkpoint), Tokenizer(tiny_checkpoint)
    expected_nll, n_tokens = 0.0, 0
    for r in records:
        # what finetuning trains on: the prompt (input after the instruction: this style has no input slot)
        # encoded on its own, then the reply and EOS
        prompt = style.apply(r["instruction"] + (f"\n\n{r['input']}" if r["input"] else ""))
        prompt_ids = style.encode(tokenizer, prompt).tolist()
        tokens = prompt_ids + tokenizer.encode(r["output"], bos=False).tolist() + [tokenizer.eos_id]
        expected_nll -= _hf_token_logprobs(tiny_checkpoint, tokens, {t: 0 for t in range(len(prompt_ids), len(tokens))})
        n_tokens += len(tokens) - len(prompt_ids)
    assert report["tokens"] == n_tokens
    assert report["bytes"] == sum(len(r["output"].encode()) for r in records)
    assert report["nll"] == pytest.approx(expected_nll, abs=1e-3)


@pytest.mark.parametrize("style_name", [None, "alpaca"])  # the checkpoint's own style (no input slot), Alpaca's
def test_perplexity_scores_exactly_the_tokens_finetuning_trains_on(tiny_checkpoint, tmp_path, style_name):
    from litllm.data.sft import parse_record
    from litllm.data.sft import tokenize_records as sft_tokenize
    from litllm.evaluate import sliding_windows, tokenize_records
    from litllm.prompts import PromptStyle, save_prompt_style
    from litllm.tokenizer import Tokenizer

    checkpoint = tiny_checkpoint
    if style_name is not None:
        checkpoint = tmp_path / "ckpt"
        shutil.copytree(tiny_checkpoint, checkpoint)
        save_prompt_style(style_name, checkpoint)
    tokenizer, style = Tokenizer(checkpoint), PromptStyle.from_checkpoint(checkpoint)
    records = [{"instruction": "Add the numbers.", "input": "1 + 2", "output": " 3, said the fox."},
               {"instruction": "Name a fox.", "output": "Reynard"}]
    (doc_with_input, doc_plain) = tokenize_records([("data.json", r) for r in records], tokenizer, checkpoint)
    for record, doc in zip(records, (doc_with_input, doc_plain)):
        (sample,) = sft_tokenize([parse_record(record, "data.json")], tokenizer, style, max_seq_length=0,
                                 mask_prompt=True, ignore_index=-100)
        trained = sample["labels"][sample["labels"] != -100].tolist()  # the tokens training takes a loss on
        scored = [t for _, continuation in sliding_windows(doc.tokens, doc.first_scored, 8, 4) for t in continuation]
        assert scored == trained == doc.tokens[doc.first_scored:]
        # and the context is the same prompt: training's inputs are the document's tokens
        assert sample["input_ids"].tolist() == doc.tokens[:-1]
    assert "1 + 2" in tokenizer.decode(doc_with_input.tokens[: doc_with_input.first_scored])  # input not dropped


def test_perplexity_rejects_bad_data(tiny_checkpoint, tmp_path):
    from litllm.evaluate import evaluate_perplexity

    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{"question": "no text field"}\n')
    (tmp_path / "broken.jsonl").write_text('{"text": "fine"}\n{"text": \n')
    (tmp_path / "data.csv").write_text("text\nhello\n")
    (tmp_path / "empty").mkdir()
    (tmp_path / "blank.json").write_text("\n")
    (tmp_path / "ok.txt").write_text("hello world")
    for data, kwargs, message in [
        ("bad.jsonl", {}, r"bad.jsonl: record 1: expected a string, a 'text' field"),
        ("broken.jsonl", {}, r"broken.jsonl: line 2 is not valid JSON"),
        ("data.csv", {}, r"expected a \.txt, \.json or \.jsonl file"),
        ("empty", {}, "no .txt, .json or .jsonl files"),
        ("blank.json", {}, r"blank.json: the file is empty \(expected a list of records\)"),
        ("ok.txt", {"stride": 500}, "--stride"),
        ("ok.txt", {"max_length": 1}, "--max_length"),
        ("ok.txt", {"stride": 0}, r"--stride: expected 1\.\.max_length \(\d+\), got 0"),  # not the default
        ("ok.txt", {"max_length": 0}, r"--max_length: expected 2\.\.\d+ \(the model's context\), got 0"),
        ("ok.txt", {"limit": 0}, "--limit"),
    ]:
        with pytest.raises(LitLLMError, match=message):
            evaluate_perplexity(tiny_checkpoint, data=tmp_path / data, device="cpu", out_dir=tmp_path / "out", **kwargs)
    with pytest.raises(LitLLMError, match="--data"):
        evaluate_perplexity(tiny_checkpoint, out_dir=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_perplexity_with_torchao_int8wo_scores_the_int8_model(tiny_checkpoint, tmp_path):
    """`evaluate_perplexity --quantize torchao.int8wo` (and `evaluate`: the same `load_model`) scores the int8 model:
    its NLL is the one of `quantize_model`'s int8 layers, not the fp32 model's (on this random model the two differ
    by only ~6e-3 nats in ~329)."""
    pytest.importorskip("torchao")
    from litllm.evaluate import evaluate_perplexity
    from litllm.model import GPT
    from litllm.quantize import quantize_model
    from litllm.tokenizer import Tokenizer

    text = "The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs!"
    (tmp_path / "a.txt").write_text(text, encoding="utf-8")
    reports = {mode: evaluate_perplexity(tiny_checkpoint, data=tmp_path / "a.txt", device="cpu", precision="32-true",
                                         quantize=mode, out_dir=tmp_path / str(mode))
               for mode in ("torchao.int8wo", None)}
    tokenizer = Tokenizer(tiny_checkpoint)
    tokens = torch.tensor([[tokenizer.bos_id] + tokenizer.encode(text, bos=False).tolist()])  # (1, T): one window
    int8 = quantize_model(GPT.from_checkpoint(tiny_checkpoint).eval(), "torchao.int8wo", "cpu")
    with torch.no_grad():
        logprobs = torch.log_softmax(int8(tokens)[0, :-1].float(), -1)  # (T - 1, vocab)
    expected_nll = -float(logprobs.gather(-1, tokens[0, 1:, None]).sum())
    error, gap = abs(reports["torchao.int8wo"]["nll"] - expected_nll), abs(reports[None]["nll"] - expected_nll)
    assert error < 1e-4 < 1e-3 < gap, (error, gap)  # measured 4e-6 and 6e-3
