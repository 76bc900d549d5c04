"""Run by tests/test_parallel.py in its own process (rank 0 of 2-rank tensor-parallel runs on the CPU): for each
checkpoint named on the command line, the same calls on `LLM.load(devices=1)` and `LLM.load(devices=2)`, printed as
one JSON line for the test to compare. The checkpoints (one per model family) share the process, one after the
other: each 2-rank model is closed (its worker leaves, the process group goes) before the next one loads, so a
family costs its worker's start, not another interpreter with torch. Before each checkpoint a line
`parallel_check: FOLDER` goes to stderr (the test splits what each family printed there)."""

import json
import sys

import torch

from litllm import LLM
from litllm.engine import Engine
from litllm.parallel.plan import local_bytes

PROMPTS = ["What food do llamas eat?", "Hi", "Tell me a story about a fox and a dog, please"]


def calls(llm: LLM) -> dict:
    out = {
        "greedy": llm.generate(PROMPTS[0], max_new_tokens=12),
        "batch": llm.generate(PROMPTS, max_new_tokens=10),
        "seeded": llm.generate(PROMPTS[2], max_new_tokens=12, temperature=0.9, top_k=20, seed=7),
        "seeded_batch": llm.generate(PROMPTS, max_new_tokens=8, temperature=1.0, top_p=0.9, seed=3),
        "stream": list(llm.generate(PROMPTS[1], max_new_tokens=8, stream=True)),
        "chat": llm.chat([{"role": "user", "content": "Hello there"}], max_new_tokens=10),
    }
    with Engine(llm.model, llm.tokenizer, 2, 32):  # its KV cache: 2 rows of 32 positions
        out["bytes"] = local_bytes(llm.model)
    out["sizes"] = {name: p.numel() * p.element_size() for name, p in llm.model.named_parameters()}  # (the test reads the single run's)
    out["json"] = constrained(llm)
    with torch.inference_mode():  # a plain forward outside an engine (scoring): broadcast to the other rank
        out["logits"] = llm.model(torch.tensor([[1, 2, 3, 4]]))[0, -1, :8].tolist()
    return out


def constrained(llm: LLM) -> list:
    """Two requests under a JSON grammar (the server's response_format), decoded together, sampled with a seed."""
    from litllm.constrain import Grammars
    from litllm.engine import Request, Sampling

    grammar = Grammars(llm.tokenizer, llm.model.config.vocab_size).json_schema()
    ids = llm.tokenizer.encode("Answer in JSON:").tolist()
    texts = {}
    with Engine(llm.model, llm.tokenizer, 2, 64) as engine:
        for seed in (1, 2):
            engine.add(Request(ids, 24, Sampling(1.0, None, 1.0, seed), grammar=grammar))
        while engine.has_unfinished:
            for out in engine.step():
                texts[out.request_id] = texts.get(out.request_id, "") + out.text
    return [texts[i] for i in sorted(texts)]


MARK = "parallel_check: "


if __name__ == "__main__":
    for checkpoint in sys.argv[1:]:
        print(MARK + checkpoint, file=sys.stderr, flush=True)
        single = calls(LLM.load(checkpoint, device="cpu"))
        llm = LLM.load(checkpoint, device="cpu", devices=2)
        sharded = calls(llm)
        llm.model.tp_channel.close()  # the next checkpoint starts a process group of its own
        print(json.dumps({"checkpoint": checkpoint, "single": single, "sharded": sharded}), flush=True)
