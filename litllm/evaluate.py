"""`litllm evaluate` (lm-eval benchmarks on a litllm model) and `litllm evaluate_perplexity` (your own text).

    litllm evaluate checkpoints/meta-llama/Llama-3.2-1B --tasks hellaswag,arc_easy --batch_size 16
    litllm evaluate checkpoints/meta-llama/Llama-3.2-1B --tasks             # list every task name
    litllm evaluate_perplexity out/finetune/lora/final --data data/held_out.jsonl

`evaluate` runs `lm_eval.simple_evaluate` on the model itself, wrapped as an lm-eval `LM`
(`litllm.eval_lm.LitLLMLM`), so every family litllm supports evaluates without an export to
transformers. `evaluate_perplexity` needs no lm-eval: it scores documents in sliding windows.
"""

from __future__ import annotations

import difflib
import json
import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Sequence, Union

import torch

from litllm.errors import LitLLMError
from litllm.flags import with_flags
from litllm.inference import LoadArgs
from litllm.scoring import score_tokens

if TYPE_CHECKING:
    from litllm.model import GPT
    from litllm.tokenizer import Tokenizer


# ---------------------------------------------------------------------- litllm evaluate
@with_flags("load", LoadArgs)
def evaluate(
    checkpoint_dir: Path,
    tasks: Optional[str] = None,
    num_fewshot: Optional[int] = None,
    batch_size: int = 1,
    limit: Optional[float] = None,
    out_dir: Optional[Path] = None,
    seed: int = 1234,
    include_path: Optional[Path] = None,
    max_length: Optional[int] = None,
    apply_chat_template: bool = False,
    log_samples: bool = False,
    *,
    load: dict,
) -> Optional[dict]:
    """Evaluate a litllm model on lm-eval tasks; write `results.json` to `out_dir` and print the table.

    Args:
        checkpoint_dir: A converted litllm model folder (`lit_model.safetensors`, `model_config.yaml`, tokenizer).
        tasks: Comma-separated lm-eval task or group names (glob patterns allowed, e.g. "mmlu_*"), or
            paths to task YAML files. `--tasks` with no value (or left out): list the available names and exit.
        num_fewshot: Few-shot examples per prompt (default: each task's own setting, else 0).
        batch_size: Requests per forward pass.
        limit: Examples per task: a count (>= 1) or a fraction (< 1). For quick checks only.
        out_dir: Where `results.json` goes (default: `<checkpoint_dir>/evaluate`).
        seed: Seed of Python, NumPy, torch and the few-shot sampler.
        include_path: A folder of your own lm-eval task YAML files (added to the built-in tasks).
        max_length: Context length in tokens (default: the model's); longer inputs lose tokens on the left.
        apply_chat_template: Format prompts with the tokenizer's chat template (instruct models).
        log_samples: Also write every request and the model's answer to `samples_<task>.jsonl`.
    """
    try:
        import lm_eval
        from lm_eval.utils import make_table
    except ImportError:
        raise LitLLMError("`litllm evaluate` needs lm-eval: pip install 'litllm[eval]'") from None

    from litllm.eval_lm import LitLLMLM
    from litllm.model_folder import check_model_folder

    if include_path is not None and not Path(include_path).is_dir():
        raise LitLLMError(f"--include_path {include_path}: folder not found")
    names = [t.strip() for t in (tasks or "").split(",") if t.strip()]
    if not names:
        manager = task_manager(include_path)
        print("\n".join(manager.all_tasks))
        print(f"\n{len(manager.all_tasks)} tasks and groups; pass some with --tasks name1,name2", flush=True)
        return None
    checkpoint_dir = check_model_folder(checkpoint_dir)
    limit = _check_limit(limit)
    _check_counts(batch_size, num_fewshot)
    out_dir = Path(out_dir) if out_dir is not None else checkpoint_dir / "evaluate"
    from litllm.utils import check_output_dir

    check_output_dir(out_dir)  # before lm-eval indexes its tasks (seconds)
    task_list = resolve_tasks(task_manager(include_path), names)

    model, tokenizer = load_model(checkpoint_dir, **load)
    lm = LitLLMLM(model, tokenizer, batch_size=batch_size, max_length=max_length, checkpoint_dir=checkpoint_dir)
    if apply_chat_template:
        lm.chat_template(True)  # fail now if there is no template
    try:
        with _quiet_git_describe():
            results = lm_eval.simple_evaluate(
                model=lm, tasks=task_list, num_fewshot=num_fewshot, batch_size=batch_size, device=str(lm.device),
                limit=limit, task_manager=task_manager(include_path), log_samples=log_samples,
                apply_chat_template=apply_chat_template, random_seed=seed, numpy_random_seed=seed,
                torch_random_seed=seed, fewshot_random_seed=seed,
            )
    except OSError as e:  # the datasets library's ConnectionError / DatasetNotFoundError / FileNotFoundError
        raise task_data_error(names, e) from None
    results["config"]["model"] = str(checkpoint_dir)
    _write_results(out_dir, results, results.pop("samples", None))
    print(make_table(results))
    if results.get("groups"):
        print(make_table(results, "groups"))
    print(f"Wrote {out_dir / 'results.json'}")
    return results


def _quiet_git_describe():
    """lm-eval records the working directory's git commit by running `git describe`, whose "fatal: not a git
    repository" reaches the terminal of everyone who evaluates outside a checkout: the same record, git's complaint
    discarded (lm-eval's own fallback, the commit read from a `.git` folder, where git is missing)."""
    import os
    import subprocess
    from unittest import mock

    from lm_eval.loggers.utils import get_commit_from_path

    def git_commit_hash():
        try:
            return subprocess.run(["git", "describe", "--always"], capture_output=True, text=True, check=True,
                                  ).stdout.strip()
        except (subprocess.CalledProcessError, FileNotFoundError):
            return get_commit_from_path(os.getcwd())

    return mock.patch("lm_eval.evaluator.get_git_commit_hash", git_commit_hash)


def _check_counts(batch_size: int, num_fewshot: Optional[int]) -> None:
    if batch_size < 1:
        raise LitLLMError(f"--batch_size: expected a positive integer, got {batch_size}")
    if num_fewshot is not None and num_fewshot < 0:
        raise LitLLMError(f"--num_fewshot: expected 0 or more, got {num_fewshot}")


def _write_results(out_dir: Path, results: dict, samples: Optional[dict]) -> None:
    """`results.json`, and with `--log_samples` one `samples_<task>.jsonl` per task (each written atomically)."""
    from lm_eval.utils import handle_non_serializable

    from litllm.utils import atomic_write_text

    atomic_write_text(out_dir / "results.json", json.dumps(results, indent=2, default=handle_non_serializable))
    for task, task_samples in (samples or {}).items():
        lines = [json.dumps(s, default=handle_non_serializable, ensure_ascii=False) for s in task_samples]
        atomic_write_text(out_dir / f"samples_{task}.jsonl", "\n".join(lines) + "\n")


# `litllm evaluate --tasks` with no value lists the tasks (see litllm/__main__.py)
evaluate.flags_without_value = ("--tasks",)

_TASK_MANAGERS: dict[Optional[str], Any] = {}


def task_manager(include_path: Optional[Path] = None):
    """lm-eval's task index (built-in tasks + `include_path`); indexing takes seconds, so it is kept per process."""
    from lm_eval.tasks import TaskManager

    key = str(Path(include_path).resolve()) if include_path is not None else None
    if key not in _TASK_MANAGERS:
        _TASK_MANAGERS[key] = TaskManager(include_path=key)
    return _TASK_MANAGERS[key]


def resolve_tasks(manager, names: Sequence[str]) -> list[str]:
    """Task names (globs expanded) and YAML paths, or a LitLLMError naming close matches of an unknown one."""
    resolved: list[str] = []
    for name in names:
        if name.endswith((".yaml", ".yml")) and Path(name).is_file():
            resolved.append(name)
            continue
        matches = manager.match_tasks([name])
        if not matches:
            close = difflib.get_close_matches(name, manager.all_tasks, n=5, cutoff=0.6)
            hint = f"; did you mean {', '.join(close)}?" if close else "; `--tasks` with no value lists every task"
            raise LitLLMError(f"--tasks: unknown task {name!r}{hint}")
        resolved.extend(m for m in matches if m not in resolved)
    return resolved


def task_data_error(names: Sequence[str], error: OSError) -> LitLLMError:
    """One line for a task whose data set can't be loaded (offline, unknown to the Hub, a missing local file).

    lm-eval builds the tasks, and the `datasets` library loads their data, inside `simple_evaluate`: every
    such failure is an OSError there (ConnectionError, FileNotFoundError, DatasetNotFoundError).
    """
    reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    which = f"--tasks {names[0]}: the task's data" if len(names) == 1 else f"--tasks {','.join(names)}: a task's data"
    return LitLLMError(
        f"{which} could not be loaded ({reason}); connect to the internet once (the datasets library caches "
        "it), or give --include_path a folder of task YAMLs whose data is local"
    )


def _check_limit(limit: Optional[float]) -> Optional[Union[int, float]]:
    if limit is None:
        return None
    if not limit > 0:
        raise LitLLMError(f"--limit: expected a count >= 1 or a fraction in (0, 1), got {limit}")
    if limit >= 1:
        if limit != int(limit):
            raise LitLLMError(f"--limit: a count must be a whole number, got {limit}")
        return int(limit)
    return limit


# ---------------------------------------------------------------------- loading
def load_model(
    checkpoint_dir: Path, device: Optional[str] = None, precision: Optional[str] = None, quantize: Optional[str] = None,
    devices: int = 1, num_nodes: int = 1, strategy: str = "tensor",
) -> tuple["GPT", "Tokenizer"]:
    """The model (eval mode, on `device`, in `precision`, optionally quantized) and tokenizer of a converted folder;
    with `devices` * `num_nodes` > 1 this rank's tensor-parallel shard (`litllm.parallel`; the other ranks follow)."""
    from litllm.inference import load_for_inference
    from litllm.tokenizer import Tokenizer

    if device is not None:
        try:
            torch.device(device)
        except RuntimeError:
            raise LitLLMError(f"--device: expected cpu, cuda, cuda:N, mps, ..., got {device!r}") from None
    from litllm.parallel import uses_devices

    if uses_devices(devices, num_nodes):
        model, _ = LoadArgs(precision, quantize, device, devices, num_nodes, strategy).for_decoding(checkpoint_dir)
        return model, Tokenizer(checkpoint_dir)
    model = load_for_inference(checkpoint_dir, device=device, precision=precision, quantize=quantize)
    return model, Tokenizer(checkpoint_dir)


# ---------------------------------------------------------------------- litllm evaluate_perplexity
@dataclass
class Document:
    """One scored text: `tokens` = prefix (BOS/EOS or a formatted prompt) + scored tokens."""

    source: str
    tokens: list[int]
    first_scored: int  # index of the first token whose log-probability counts
    n_bytes: int  # UTF-8 bytes of the scored text


@with_flags("load", LoadArgs)
def evaluate_perplexity(
    checkpoint_dir: Path,
    data: Optional[Path] = None,
    max_length: Optional[int] = None,
    stride: Optional[int] = None,
    batch_size: int = 1,
    limit: Optional[int] = None,
    out_dir: Optional[Path] = None,
    *,
    load: dict,
) -> dict:
    """Perplexity and bits per byte of a model on your own text; prints them and writes `perplexity.json`.

    Each document is scored on its own, after the BOS token (EOS when the tokenizer has no BOS).
    Texts longer than `max_length` are scored in sliding windows: windows start every `stride`
    tokens, and each token is scored in the first window that predicts it, so it sees at least
    `max_length - stride` tokens of context (fewer only near the start of the document).

    Args:
        checkpoint_dir: A converted litllm model folder.
        data: A .txt file (one document), a .json file (a list of records) or .jsonl file (one record
            per line), or a folder of such files. A record is a string, {"text": ...}, or an
            instruction record {"instruction", "input" (optional), "output"}, tokenized exactly as
            finetuning tokenizes it (prompt in the model's prompt style, reply + EOS), the reply scored.
        max_length: Window length in tokens (default: the model's context).
        stride: Tokens between window starts (default: max_length // 2; max_length gives disjoint windows).
        batch_size: Windows per forward pass.
        limit: Score only the first N documents.
        out_dir: Where `perplexity.json` goes (default: `<checkpoint_dir>/evaluate`).
    """
    from litllm.tokenizer import Tokenizer
    from litllm.model_folder import check_model_folder
    from litllm.utils import atomic_write_text

    if data is None:
        raise LitLLMError("--data: expected a .txt/.json/.jsonl file or a folder of them")
    checkpoint_dir = check_model_folder(checkpoint_dir)
    if batch_size < 1:
        raise LitLLMError(f"--batch_size: expected a positive integer, got {batch_size}")
    if limit is not None and limit < 1:
        raise LitLLMError(f"--limit: expected a number of documents >= 1, got {limit}")
    records = read_records(Path(data))[:limit]
    tokenizer = Tokenizer(checkpoint_dir)
    documents = tokenize_records(records, tokenizer, checkpoint_dir)
    out_dir = Path(out_dir) if out_dir is not None else checkpoint_dir / "evaluate"
    from litllm.utils import check_output_dir

    check_output_dir(out_dir)

    model, _ = load_model(checkpoint_dir, **load)
    max_length, stride = _window(model.max_seq_length, max_length, stride)
    summary = perplexity_summary(documents, _documents_nll(model, documents, max_length, stride, batch_size))
    report = {
        "checkpoint_dir": str(checkpoint_dir),
        "data": str(data),
        "max_length": max_length,
        "stride": stride,
        **summary["total"],
        "sources": summary["sources"],
    }
    atomic_write_text(out_dir / "perplexity.json", json.dumps(report, indent=2))
    print(
        f"{report['documents']} documents, {report['tokens']} tokens, {report['bytes']} bytes: "
        f"perplexity {report['perplexity']:.4f}, bits per byte {report['bits_per_byte']:.4f}"
    )
    print(f"Wrote {out_dir / 'perplexity.json'}")
    return report


def _window(context: int, max_length: Optional[int], stride: Optional[int]) -> tuple[int, int]:
    """`(max_length, stride)` with their defaults (the model's `context`, half of it), checked."""
    max_length = context if max_length is None else max_length  # (0 is no default: an error, as -5 is)
    if not 1 < max_length <= context:
        raise LitLLMError(f"--max_length: expected 2..{context} (the model's context), got {max_length}")
    stride = max(1, max_length // 2) if stride is None else stride
    if not 0 < stride <= max_length:
        raise LitLLMError(f"--stride: expected 1..max_length ({max_length}), got {stride}")
    return max_length, stride


def _documents_nll(model, documents: list[Document], max_length: int, stride: int, batch_size: int) -> list[float]:
    """Each document's negative log-likelihood (nats) over its scored tokens, scored in sliding windows."""
    requests, owner = [], []
    for d, doc in enumerate(documents):
        for context, continuation in sliding_windows(doc.tokens, doc.first_scored, max_length, stride):
            requests.append((context, continuation))
            owner.append(d)
    scores = score_tokens(model, requests, batch_size=batch_size, max_length=max_length, desc="perplexity")
    nll = [0.0] * len(documents)
    for d, (logprob, _) in zip(owner, scores):
        nll[d] -= logprob
    return nll


def sliding_windows(
    tokens: Sequence[int], first_scored: int, max_length: int, stride: int
) -> list[tuple[list[int], list[int]]]:
    """(context, continuation) pairs scoring tokens[first_scored:] exactly once.

    Windows start at 0, stride, 2*stride, ...; the window starting at b reads up to `max_length`
    tokens tokens[b:b+max_length] and predicts tokens[b+1:b+max_length+1]; each token is scored in
    the first window that predicts it.
    """
    if first_scored < 1:
        raise ValueError("the first token has no context: first_scored must be >= 1")
    pairs = []
    n = len(tokens)
    next_target = first_scored  # first token not scored yet
    begin = 0
    while next_target < n:
        end = min(begin + max_length, n - 1)  # last target of this window
        if end >= next_target:
            lo = max(next_target, begin + 1)
            pairs.append((list(tokens[begin:lo]), list(tokens[lo : end + 1])))
            next_target = end + 1
        begin += stride
    return pairs


def read_records(path: Path) -> list[tuple[str, Union[str, dict]]]:
    """(source, record) pairs from a .txt/.json/.jsonl file or a folder of them (sorted, recursive)."""
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in (".txt", ".json", ".jsonl"))
        if not files:
            raise LitLLMError(f"--data {path}: no .txt, .json or .jsonl files in this folder")
    elif path.is_file():
        files = [path]
    else:
        raise LitLLMError(f"--data {path}: file or folder not found")
    records: list[tuple[str, Union[str, dict]]] = []
    for file in files:
        if file.suffix == ".txt":
            records.append((str(file), _read_text(file)))
        elif file.suffix == ".jsonl":
            for n, line in enumerate(_read_text(file).splitlines(), start=1):
                if line.strip():
                    try:
                        records.append((str(file), json.loads(line)))
                    except json.JSONDecodeError as e:
                        raise LitLLMError(f"{file}: line {n} is not valid JSON ({e.msg})") from None
        elif file.suffix == ".json":
            text = _read_text(file)
            if not text.strip():  # as finetuning's JSON data says it, not "invalid JSON (Expecting value)"
                raise LitLLMError(f"{file}: the file is empty (expected a list of records)")
            try:
                content = json.loads(text)
            except json.JSONDecodeError as e:
                raise LitLLMError(f"{file}: invalid JSON ({e.msg} at line {e.lineno})") from None
            if isinstance(content, dict) and "text" in content:
                content = [content]
            if not isinstance(content, list):
                raise LitLLMError(f"{file}: expected a list of records (strings or objects with a 'text' field)")
            records.extend((str(file), r) for r in content)
        else:
            raise LitLLMError(f"--data {file}: expected a .txt, .json or .jsonl file")
    if not records:
        raise LitLLMError(f"--data {path}: no documents found")
    return records


def _read_text(file: Path) -> str:
    try:
        return file.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise LitLLMError(f"--data {file}: not UTF-8 text (byte {e.start}: {e.reason})") from None
    except OSError as e:
        raise LitLLMError(f"--data {file}: can't read it ({e.strerror or e})") from None


def tokenize_records(
    records: Sequence[tuple[str, Union[str, dict]]], tokenizer: "Tokenizer", checkpoint_dir: Path
) -> list[Document]:
    """Plain texts after the prefix token (BOS, else EOS); instruction records encoded as finetuning encodes
    them (`litllm.data.sft.encode_record`), the reply and EOS scored after the prompt."""
    from litllm.data.sft import encode_record, parse_record

    prefix = tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.eos_id
    style = None
    documents = []
    for i, (source, record) in enumerate(records):
        where = f"{source}: record {i}"
        if isinstance(record, dict) and "text" in record:
            record = record["text"]
        if isinstance(record, str):
            if prefix is None:
                raise LitLLMError(f"{checkpoint_dir}: the tokenizer has neither BOS nor EOS to start a document with")
            tokens = tokenizer.encode(record, bos=False).tolist()
            if tokens:
                documents.append(Document(source, [prefix] + tokens, 1, len(record.encode("utf-8"))))
            continue
        if not isinstance(record, dict) or not {"instruction", "output"} <= record.keys():
            raise LitLLMError(f"{where}: expected a string, a 'text' field, or 'instruction' and 'output' fields")
        if style is None:
            from litllm.prompts import PromptStyle

            style = PromptStyle.from_checkpoint(checkpoint_dir)
        # exactly the tokens finetuning trains on: prompt (input placed as training places it) + reply + EOS
        tokens, is_reply = encode_record(parse_record(record, where), tokenizer, style)
        first_scored = is_reply.index(True)
        if first_scored == 0:
            raise LitLLMError(f"{where}: the prompt is empty and the tokenizer adds no BOS (nothing to condition on)")
        documents.append(Document(source, tokens, first_scored, len(record["output"].encode("utf-8"))))
    if not documents:
        raise LitLLMError("--data: every document is empty")
    return documents


def perplexity_summary(documents: Sequence[Document], nll: Sequence[float]) -> dict:
    """Totals and per-source figures: token perplexity exp(nll / tokens) and bits per byte nll / (ln 2 * bytes)."""

    def figures(docs: list[int]) -> dict:
        total_nll = sum(nll[d] for d in docs)
        tokens = sum(len(documents[d].tokens) - documents[d].first_scored for d in docs)
        n_bytes = sum(documents[d].n_bytes for d in docs)
        return {
            "documents": len(docs),
            "tokens": tokens,
            "bytes": n_bytes,
            "nll": total_nll,
            "perplexity": math.exp(total_nll / tokens),
            "bits_per_byte": total_nll / (math.log(2) * n_bytes) if n_bytes else None,
        }

    by_source: dict[str, list[int]] = defaultdict(list)
    for d, doc in enumerate(documents):
        by_source[doc.source].append(d)
    return {"total": figures(list(range(len(documents)))), "sources": {s: figures(ds) for s, ds in by_source.items()}}
