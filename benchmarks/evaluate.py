"""Wall time of `litllm evaluate` (LitLLMLM) vs lm-eval's Hugging Face backend (HFLM) on the same model.

Builds a random Llama checkpoint with a BPE tokenizer trained on the spot, converts it to litllm,
writes three local lm-eval tasks (multiple choice, generate_until, rolling loglikelihood) from
`../shared/data` when present (else from generated text), then runs each task with both backends in
one process and prints the seconds (best of `--repeats` alternating runs, model loading excluded),
the ratio and the largest difference between their answers.

    python benchmarks/evaluate.py [--device cuda] [--batch_size 16] [--limit 200] [--layers 8 --hidden 512]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


# ---------------------------------------------------------------------- data
def corpus_text() -> str:
    for name in ("wiki_demo.txt", "tinyshakespeare.txt"):
        if (SHARED_DATA / name).is_file():
            return (SHARED_DATA / name).read_text(encoding="utf-8")[:2_000_000]
    rng = random.Random(0)
    words = ["the", "a", "of", "to", "and", "in", "is", "was", "for", "on", "that", "with", "as", "by", "at"]
    words += [f"w{i}" for i in range(400)]
    return "\n".join(" ".join(rng.choice(words) for _ in range(rng.randint(8, 30))) + "." for _ in range(20000))


def build_tasks(folder: Path, text: str, n_docs: int) -> list[str]:
    """multiple choice (which ending follows?), generation (continue a sentence), rolling perplexity (paragraphs)."""
    rng = random.Random(0)
    sentences = [s.strip() for s in re.split(r"(?<=[.!?])\s+", text) if 40 < len(s.strip()) < 300]
    rng.shuffle(sentences)
    mc = []
    for i in range(n_docs):
        s = sentences[i]
        cut = len(s) // 2
        others = [sentences[(i + k) % len(sentences)] for k in (101, 202, 303)]
        choices = [s[cut:]] + [o[len(o) // 2 :] for o in others]
        rng.shuffle(choices)
        mc.append({"context": s[:cut], "choices": choices, "answer": choices.index(s[cut:])})
    gen = [{"prompt": s[: len(s) // 2], "answer": s[len(s) // 2 :]} for s in sentences[n_docs : 2 * n_docs]]
    # documents of ~4000 characters from spread-out places of the corpus (several context windows each)
    starts = sorted(rng.sample(range(max(1, len(text) - 4000)), n_docs))
    ppl = [{"text": text[s : s + 4000]} for s in starts]
    for name, rows in (("mc", mc), ("gen", gen), ("ppl", ppl)):
        (folder / f"{name}.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    header = "dataset_path: json\ntest_split: test\ndataset_kwargs:\n  data_files:\n    test: {}\n"
    (folder / "mc.yaml").write_text(
        "task: bench_mc\n" + header.format(folder / "mc.jsonl") + "output_type: multiple_choice\n"
        'doc_to_text: "{{context}}"\ndoc_to_choice: choices\ndoc_to_target: answer\n'
        "metric_list:\n  - {metric: acc, aggregation: mean, higher_is_better: true}\n"
    )
    (folder / "gen.yaml").write_text(
        "task: bench_gen\n" + header.format(folder / "gen.jsonl") + "output_type: generate_until\n"
        'doc_to_text: "{{prompt}}"\ndoc_to_target: "{{answer}}"\n'
        'generation_kwargs:\n  until: ["\\n\\n"]\n  max_gen_toks: 32\n  do_sample: false\n'
        "metric_list:\n  - {metric: exact_match, aggregation: mean, higher_is_better: true}\n"
    )
    (folder / "ppl.yaml").write_text(
        "task: bench_ppl\n" + header.format(folder / "ppl.jsonl") + "output_type: loglikelihood_rolling\n"
        'doc_to_text: ""\ndoc_to_target: "{{text}}"\n'
        "metric_list:\n  - {metric: word_perplexity, aggregation: weighted_perplexity, higher_is_better: false}\n"
    )
    return ["bench_mc", "bench_gen", "bench_ppl"]


# ---------------------------------------------------------------------- model
def build_checkpoint(folder: Path, text: str, layers: int, hidden: int, vocab: int, context: int) -> None:
    """A random Llama (HF files + tokenizer), converted to litllm in place."""
    import torch
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    from litllm.convert import convert_to_litllm

    folder.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<s>", "</s>", "<unk>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(text.splitlines(), trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "add_bos_token": True,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }))
    (folder / "generation_config.json").write_text(json.dumps({"bos_token_id": 0, "eos_token_id": 1}))
    config = transformers.LlamaConfig(
        vocab_size=tok.get_vocab_size(), hidden_size=hidden, intermediate_size=hidden * 8 // 3 // 64 * 64,
        num_hidden_layers=layers, num_attention_heads=hidden // 64, num_key_value_heads=max(1, hidden // 256),
        max_position_embeddings=context, bos_token_id=0, eos_token_id=1,
    )
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    convert_to_litllm(folder)


# ---------------------------------------------------------------------- timing
def time_task(make_lm, task: str, manager, limit: int) -> tuple[float, dict]:
    import lm_eval

    lm = make_lm()
    start = time.perf_counter()
    results = lm_eval.simple_evaluate(
        model=lm, tasks=[task], task_manager=manager, limit=limit, log_samples=True, bootstrap_iters=0
    )
    return time.perf_counter() - start, results


def largest_difference(a: dict, b: dict, task: str) -> str:
    def by_doc(results: dict) -> list:
        return sorted(results["samples"][task], key=lambda s: s["doc_id"])

    pairs = zip(by_doc(a), by_doc(b))
    diff, relative, mismatched = 0.0, 0.0, 0
    for x, y in pairs:
        for rx, ry in zip(x["resps"], y["resps"]):
            rx, ry = rx[0], ry[0]
            if isinstance(rx, str):
                mismatched += rx != ry
            else:
                rx, ry = (rx[0], ry[0]) if isinstance(rx, (list, tuple)) else (rx, ry)
                diff = max(diff, abs(rx - ry))
                relative = max(relative, abs(rx - ry) / max(abs(rx), 1e-12))
    if "gen" in task:
        return f"{mismatched} generated texts differ"
    return f"max |d logprob| {diff:.1e} (relative {relative:.1e})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default=None)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--limit", type=int, default=200, help="documents per task")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=8000)
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=2, help="runs per backend and task, alternating; best kept")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()

    import torch
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from litllm.eval_lm import LitLLMLM
    from litllm.evaluate import load_model

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="litllm-eval-bench-"))
    text = corpus_text()
    model_dir, task_dir = workdir / "model", workdir / "tasks"
    task_dir.mkdir(parents=True, exist_ok=True)
    if not (model_dir / "lit_model.safetensors").is_file():
        build_checkpoint(model_dir, text, args.layers, args.hidden, args.vocab, args.context)
    tasks = build_tasks(task_dir, text, args.limit)
    manager = TaskManager(include_path=str(task_dir), include_defaults=False)
    torch.set_grad_enabled(False)
    if args.threads:
        torch.set_num_threads(args.threads)

    def hf():
        return HFLM(pretrained=str(model_dir), batch_size=args.batch_size, device=device, dtype="float32")

    def lit():
        model, tokenizer = load_model(model_dir, device, "32-true")
        return LitLLMLM(model, tokenizer, batch_size=args.batch_size, checkpoint_dir=model_dir)

    print(f"device {device}, {torch.get_num_threads()} threads, batch size {args.batch_size}, "
          f"{args.limit} documents per task, fp32, "
          f"Llama {args.layers} layers x {args.hidden}, context {args.context}, corpus "
          f"{'shared/data' if SHARED_DATA.is_dir() else 'generated'}")
    rows = []
    for task in tasks:
        manager.load([task])  # build the dataset cache once, outside the timings
        hf_times, lit_times = [], []
        for _ in range(args.repeats):  # alternate, so a busy machine slows both alike
            hf_s, hf_res = time_task(hf, task, manager, args.limit)
            lit_s, lit_res = time_task(lit, task, manager, args.limit)
            hf_times.append(hf_s)
            lit_times.append(lit_s)
        rows.append((task, min(hf_times), min(lit_times), largest_difference(hf_res, lit_res, task)))
    print(f"\n{'task':12s} {'HFLM s':>9s} {'litllm s':>9s} {'speedup':>8s}  agreement")
    for task, hf_s, lit_s, agreement in rows:
        print(f"{task:12s} {hf_s:9.2f} {lit_s:9.2f} {hf_s / lit_s:7.2f}x  {agreement}")
    total_hf, total_lit = sum(r[1] for r in rows), sum(r[2] for r in rows)
    print(f"{'total':12s} {total_hf:9.2f} {total_lit:9.2f} {total_hf / total_lit:7.2f}x")


if __name__ == "__main__":
    main()
