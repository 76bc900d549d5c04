"""Scoring: log P(continuation | context) of token sequences under a litllm model.

The one scorer behind lm-eval's log-likelihood requests (`litllm.eval_lm`) and `litllm
evaluate_perplexity` (`litllm.evaluate`); both import it from here, so neither imports the other.
"""

from __future__ import annotations

from collections import defaultdict
from typing import TYPE_CHECKING, Optional, Sequence

import torch
from tqdm import tqdm

from litllm.errors import LitLLMError

if TYPE_CHECKING:
    from litllm.model import GPT


@torch.inference_mode()
def score_tokens(
    model: "GPT",
    requests: Sequence[tuple[Sequence[int], Sequence[int]]],
    batch_size: int = 1,
    max_length: Optional[int] = None,
    desc: str = "scoring",
    disable_tqdm: bool = False,
) -> list[tuple[float, bool]]:
    """(log P(continuation | context), is the continuation the greedy one) for each (context, continuation).

    The model reads context + continuation minus its last token, left-truncated to `max_length`
    tokens; the last len(continuation) positions predict the continuation. Requests with the same
    input share one forward pass (one-token answer choices of a question); inputs run longest first,
    `batch_size` per forward pass, right-padded (causal attention never looks at the padding).
    Log-probabilities are taken over the real vocabulary (`config.vocab_size`), in fp32.
    """
    max_length = max_length or model.max_seq_length
    vocab_size = model.config.vocab_size
    device = model.wte.weight.device
    by_input: dict[tuple[int, ...], list[int]] = defaultdict(list)
    for i, (context, continuation) in enumerate(requests):
        if not continuation:
            raise LitLLMError("a request with an empty continuation (nothing to score)")
        if len(continuation) > max_length:
            raise LitLLMError(f"a continuation of {len(continuation)} tokens exceeds max_length {max_length}")
        whole = list(context) + list(continuation)
        by_input[tuple(whole[-(max_length + 1) :][:-1])].append(i)
    inputs = sorted(by_input, key=lambda ids: (-len(ids), ids))
    chunk = max(1, 2**26 // vocab_size)  # positions per fp32 log-softmax (256 MB)

    results: list[Optional[tuple[float, bool]]] = [None] * len(requests)
    bar = tqdm(total=len(requests), desc=desc, disable=disable_tqdm)
    for start in range(0, len(inputs), batch_size):
        batch = inputs[start : start + batch_size]
        T = max(len(ids) for ids in batch)
        idx = torch.zeros(len(batch), T, dtype=torch.long)
        for row, ids in enumerate(batch):
            idx[row, : len(ids)] = torch.tensor(ids)
        logits = model(idx.to(device))  # (B, T, padded_vocab)
        request_ids = [i for ids in batch for i in by_input[ids]]
        slot = {i: k for k, i in enumerate(request_ids)}
        token_logprob, missed, owners = [], [], []
        for row, ids in enumerate(batch):
            # the continuations of this input all end where it ends: its last n_max positions predict them
            members = by_input[ids]
            n_max = max(len(requests[i][1]) for i in members)
            offsets, targets, owner = [], [], []
            for i in members:
                n = len(requests[i][1])
                offsets += range(n_max - n, n_max)
                targets += requests[i][1]
                owner += [slot[i]] * n
            offsets_t, targets_t = torch.tensor(offsets, device=device), torch.tensor(targets, device=device)
            owner_t = torch.tensor(owner, device=device)
            scored = logits[row, len(ids) - n_max : len(ids), :vocab_size]  # (n_max, vocab), a view
            # fp32 log-softmax a slice of positions at a time: (n_max, vocab) at once could dwarf the model
            for lo in range(0, n_max, chunk):
                pick = (offsets_t >= lo) & (offsets_t < lo + chunk)
                at, target = offsets_t[pick] - lo, targets_t[pick]
                logprobs = torch.log_softmax(scored[lo : lo + chunk].float(), dim=-1)  # (<=chunk, vocab)
                token_logprob.append(logprobs[at, target].double())
                missed.append((logprobs.argmax(dim=-1)[at] != target).long())  # 1 where greedy differs
                owners.append(owner_t[pick])
        owners_t = torch.cat(owners)
        # per-request sums: log-probability (fp64) and tokens greedy decoding would get wrong
        totals = torch.zeros(len(request_ids), dtype=torch.float64, device=device)
        totals.index_add_(0, owners_t, torch.cat(token_logprob))
        misses = torch.zeros(len(request_ids), dtype=torch.long, device=device)
        misses.index_add_(0, owners_t, torch.cat(missed))
        for i, total, miss in zip(request_ids, totals.tolist(), misses.tolist()):
            results[i] = (total, miss == 0)
        bar.update(len(request_ids))
    bar.close()
    return results  # type: ignore[return-value]
