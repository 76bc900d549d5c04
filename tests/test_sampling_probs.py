"""`sampling_probs` (the distribution the engine samples from) against the function it replaced, which sorted the whole
vocabulary of every row for top_p (`sort_nucleus_probs`, kept here as the reference; benchmarks/sampling.py times the
two): the same probabilities bit for bit wherever top_k is set, on many random rows (ties, -inf, tiny temperatures and
top_p); with top_p alone the same kept tokens but where rounding decides (checked against the nucleus in float64); a
tie at the nucleus's boundary keeps the whole tie; a row's distribution does not depend on the rows batched with it."""

from __future__ import annotations

import pytest
import torch

from litllm.engine import sampling_probs

pytestmark = pytest.mark.usefixtures("one_thread")  # many small ops: on a shared host each parallel one waits long


def sort_nucleus_probs(logits: torch.Tensor, temperature: float, top_k=None, top_p: float = 1.0) -> torch.Tensor:
    """`sampling_probs` as it was until session 35: top_p by a descending sort of the whole row (the tie order at the
    boundary torch.sort's)."""
    logits = logits.float()
    if temperature == 1.0 and top_k is None and top_p >= 1.0:
        return logits.softmax(dim=-1)
    logits = (logits - logits.amax(dim=-1, keepdim=True)) / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        # drop a token when the ones ranked above it already reach top_p (the top token always stays)
        drop_sorted = (cum - sorted_logits.softmax(dim=-1)) >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits.softmax(dim=-1)


def with_ties_kept(logits: torch.Tensor, temperature: float, kept: torch.Tensor) -> torch.Tensor:
    """The softmax of the tempered logits (as `sampling_probs` shifts and divides them) over `kept` and every token
    tied with a kept one: the tie rule at the nucleus's boundary, where the sort kept some of a tie in its own order."""
    logits = (logits.float() - logits.float().amax(dim=-1, keepdim=True)) / temperature
    floor = logits.masked_fill(~kept, float("inf")).amin(dim=-1, keepdim=True)
    return logits.masked_fill(logits < floor, float("-inf")).softmax(dim=-1)


def mass_above(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """(..., vocab) float64: the probability of the tokens with a larger logit than each, by a float64 softmax of the
    tempered logits: the nucleus keeps a token when this is below top_p."""
    logits = (logits.double() - logits.double().amax(dim=-1, keepdim=True)) / temperature
    ascending, order = logits.sort(dim=-1)
    descending = logits.softmax(dim=-1).gather(-1, order).flip(-1)  # (..., vocab) the probabilities, largest first
    top = torch.cat([torch.zeros_like(descending[..., :1]), descending.cumsum(-1)], dim=-1)  # the mass of the n largest
    larger = logits.size(-1) - torch.searchsorted(ascending, logits, right=True)  # (..., vocab) how many are larger
    return top.gather(-1, larger)


def rows_of(vocab: int, generator: torch.Generator) -> list[torch.Tensor]:
    """(8, vocab) logits rows: spread out and peaked, rounded to few values (ties everywhere), -inf masks (fewer finite
    tokens than top_k), large offsets, bf16."""
    normal = torch.randn(8, vocab, generator=generator)
    masked = normal.clone()
    masked[:4, 3:] = float("-inf")  # 3 finite tokens
    masked[4:, torch.randperm(vocab, generator=generator)[: vocab // 2]] = float("-inf")
    return [normal * 0.3, normal, normal * 3, normal * 8, (normal * 2).round(), (normal * 0.5).round(), masked,
            normal * 2 + 1e4, (normal * 3).bfloat16()]


def check_against_the_sort(logits: torch.Tensor, temperature: float, top_k, top_p: float) -> None:
    new = sampling_probs(logits, temperature, top_k, top_p)
    old = sort_nucleus_probs(logits, temperature, top_k, top_p)
    assert new.dtype == old.dtype == torch.float32 and new.shape == old.shape
    if top_k is not None and top_k < logits.size(-1) or top_p >= 1.0:
        # the same numbers summed in the same order: bit for bit, but for ties the sort split at the boundary
        expected = old if torch.equal(new, old) else with_ties_kept(logits, temperature, old > 0)
        assert torch.equal(new, expected), (temperature, top_k, top_p)
        return
    # top_p alone: the probabilities the nucleus sums are normalised in vocabulary order, the sort's in sorted order
    # (an ulp apart): a token may go either way only where its mass above is within rounding of top_p
    kept, kept_before = new > 0, old > 0
    if not torch.equal(kept, kept_before):
        kept_before = with_ties_kept(logits, temperature, kept_before) > 0
    if not torch.equal(kept, kept_before):
        either = kept != kept_before
        assert ((mass_above(logits, temperature)[either] - top_p).abs() < 1e-5).all(), (temperature, top_p)
    else:
        assert torch.equal(new, old if torch.equal(old > 0, kept) else with_ties_kept(logits, temperature, kept))


def test_sampling_probs_equal_the_full_sort():
    generator = torch.Generator().manual_seed(0)
    for vocab in (6, 64, 1000):
        for logits in rows_of(vocab, generator):
            for top_k in (None, 1, 50, vocab - 1, vocab):
                for top_p in (1.0, 0.9, 0.999, 1e-6):
                    check_against_the_sort(logits, 0.7, top_k, top_p)
            for top_k, top_p in ((None, 0.5), (5, 0.5)):
                check_against_the_sort(logits, 1e-3, top_k, top_p)  # a tiny temperature: one token, or a tie
                check_against_the_sort(logits, 1.0, top_k, top_p)


def test_sampling_probs_equal_the_full_sort_over_a_large_vocabulary():
    """32000 tokens (the 1024 window and the whole-row fallback of top_p alone) and a vocabulary not a multiple of 16,
    rows of (2, 3, vocab)."""
    generator = torch.Generator().manual_seed(1)
    for vocab, spread in ((32000, 1.0), (32000, 3.0), (4099, 8.0)):
        logits = torch.randn(2, 3, vocab, generator=generator) * spread
        for top_k, top_p in ((50, 0.9), (None, 0.9), (None, 0.999), (2000, 0.95)):
                check_against_the_sort(logits, 0.7, top_k, top_p)


def test_top_p_at_the_sorts_own_sums_drops_the_same_token():
    """top_p set to exactly the mass above the i-th token as the sort summed it (float32 softmax of the sorted row,
    float64 cumsum): the token is dropped and the one before kept, so an ulp off in the sums would keep it: with top_k
    (1 to 200 survivors, of vocabularies of 50 to 32000) the same kept tokens and probabilities, bit for bit."""
    generator = torch.Generator().manual_seed(3)
    for vocab, top_k in ((50, 3), (50, 17), (1000, 64), (32000, 50)):
        logits = torch.randn(4, vocab, generator=generator) * 2
        shifted = (logits - logits.amax(dim=-1, keepdim=True)) / 0.7
        ranked = shifted.sort(dim=-1, descending=True).values.masked_fill(torch.arange(vocab) >= top_k, float("-inf"))
        above = ranked.softmax(dim=-1).cumsum(dim=-1) - ranked.softmax(dim=-1)  # (4, vocab) as the sort had them
        for row in range(4):
            for i in range(1, min(top_k, 20)):
                top_p = above[row, i].item()
                if 0 < top_p < 1:
                    check_against_the_sort(logits[row: row + 1], 0.7, top_k, top_p)


def test_the_survivors_softmax_is_the_whole_sorted_rows():
    """`ranked_softmax` of w descending logits gives bit for bit the first w of the softmax of the whole sorted row
    (-inf after them), for w under and over one vector of floats (torch sums fewer than 16 floats one by one, not in
    lanes: unpadded, 3 to 15 survivors differ in 10-60% of rows)."""
    from litllm.engine import ranked_softmax

    generator = torch.Generator().manual_seed(4)
    for vocab in (10, 100, 32000):
        for width in (1, 3, 5, 9, 15, 16, 17, 50, 64, 65):
            if width <= vocab:
                ranked = (torch.randn(200, width, generator=generator) * 2).sort(dim=-1, descending=True).values
                ranked = ranked - ranked[:, :1]
                whole = torch.nn.functional.pad(ranked, (0, vocab - width), value=float("-inf")).softmax(dim=-1)
                assert torch.equal(ranked_softmax(ranked, vocab), whole[:, :width]), (vocab, width)


def test_a_tie_at_the_nucleus_boundary_stays_whole():
    """The nucleus keeps a token when the tokens with a larger logit hold less than top_p: tokens tied with a kept one
    stay too (the sort kept those it ranked first); a tie at the k-th logit stays whole (as before)."""
    logits = torch.tensor([[3.0, 2.0, 2.0, 2.0, 0.0, -1.0]])
    probs = logits.softmax(dim=-1)[0]  # [0.50, 0.18, 0.18, 0.18, 0.025, 0.009]
    assert probs[0] < 0.6 < probs[:2].sum()
    for top_k in (None, 4, 2):
        kept = sampling_probs(logits, 1.0, top_k, 0.6) > 0
        assert kept.tolist() == [[True, True, True, True, False, False]], top_k
    assert (sampling_probs(logits, 1.0, 2) > 0).tolist() == [[True, True, True, True, False, False]]
    assert (sampling_probs(logits, 1.0, 2, 0.4) > 0).tolist() == [[True, False, False, False, False, False]]


def test_a_rows_distribution_does_not_depend_on_its_batch():
    """Each row's probabilities are the same bit for bit alone and batched with rows that widen the work for all (a
    spread-out row sends top_p alone's window to the whole vocabulary; a tie at the k-th logit widens top_k's)."""
    generator = torch.Generator().manual_seed(2)
    peaked = torch.randn(3, 32000, generator=generator) * 8
    spread = torch.randn(2, 32000, generator=generator)
    tied = spread.round()
    for top_k, top_p in ((None, 0.9), (50, 0.9), (None, 0.5)):
        batch = torch.cat([peaked, spread, tied])
        together = sampling_probs(batch, 0.7, top_k, top_p)
        for i, row in enumerate(batch):
            assert torch.equal(together[i], sampling_probs(row[None], 0.7, top_k, top_p)[0]), (i, top_k, top_p)


def test_rows_without_a_distribution_stay_nan():
    """A row with a NaN or +inf logit, or all -inf, gives NaN probabilities as before (the engine's draw then fails
    that request alone), whatever the settings, and leaves the other rows of its batch as they are alone."""
    logits = torch.randn(4, 100, generator=torch.Generator().manual_seed(5))
    logits[0, 5], logits[1, 7], logits[2] = float("nan"), float("inf"), float("-inf")
    for top_k, top_p in ((50, 0.9), (None, 0.9), (50, 1.0), (None, 1.0)):
        probs = sampling_probs(logits, 0.7, top_k, top_p)
        assert probs[:3].isnan().all() and sort_nucleus_probs(logits[:3], 0.7, top_k, top_p).isnan().all()
        assert torch.equal(probs[3], sampling_probs(logits[3:], 0.7, top_k, top_p)[0]), (top_k, top_p)
