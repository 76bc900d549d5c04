"""Grammar-constrained decoding (structured output, forced tool calls) with `xgrammar`.

    grammars = Grammars(tokenizer, vocab_size=model.config.vocab_size)   # once per tokenizer
    request = Request(ids, 200, grammar=grammars.json_schema({"type": "object", ...}))

A `Grammar` is compiled once per request and shared by its n choices; the engine calls `grammar.start(stop ids)`
for each row it admits, and the returned `GrammarState` masks that row's logits (tokens the grammar forbids get
-inf) before sampling and follows the tokens it picks. xgrammar (MLC's, used by vLLM and SGLang) builds the token
masks from the tokenizer's vocabulary; we hand it our `tokenizers` tokenizer through transformers' fast-tokenizer
wrapper. The `serve` extra installs it; it is imported on first use only.
"""

from __future__ import annotations

import json
from typing import Optional, Sequence

import torch

from litllm.errors import LitLLMError


_BOUNDED_STRING_CHAR = r'[^\"\\\r\n]'
_JSON_STRING_CHAR = r'[^\0-\x1f\"\\]'


class GrammarState:
    """One row's place in its grammar: `mask_` its next-token logits, `accept` the token picked."""

    def __init__(self, xgr, compiled, stop_token_ids: Sequence[int]) -> None:
        self._xgr = xgr
        stops = list(stop_token_ids) or None  # none: the tokenizer's EOS
        self._matcher = xgr.GrammarMatcher(compiled, override_stop_tokens=stops)
        self._bitmask = xgr.allocate_token_bitmask(1, compiled.tokenizer_info.vocab_size)  # (1, ceil(V / 32)) int32

    def mask_(self, logits: torch.Tensor) -> None:
        """Set the logits (1, vocab) of the tokens the grammar forbids next to -inf, in place."""
        self._matcher.fill_next_token_bitmask(self._bitmask, 0)
        self._xgr.apply_token_bitmask_inplace(logits, self._bitmask.to(logits.device, non_blocking=True))

    def accept(self, token: int) -> None:
        if not self._matcher.accept_token(token):
            raise LitLLMError(f"token {token} breaks the request's grammar (it was not masked out)")

    @property
    def done(self) -> bool:
        """The grammar is complete and its stop token was accepted: nothing may follow."""
        return self._matcher.is_terminated()


class Grammar:
    """A compiled grammar (immutable, shared by the rows of one request)."""

    def __init__(self, xgr, compiled) -> None:
        self._xgr, self._compiled = xgr, compiled

    def start(self, stop_token_ids: Sequence[int] = ()) -> GrammarState:
        return GrammarState(self._xgr, self._compiled, stop_token_ids)


class Grammars:
    """Compiles grammars against one tokenizer's vocabulary (`vocab_size`: the model's logits width, which may
    exceed the tokenizer's; the extra ids are never allowed)."""

    def __init__(self, tokenizer, vocab_size: Optional[int] = None) -> None:
        try:
            import xgrammar as xgr
        except ImportError:
            raise LitLLMError("structured output needs xgrammar: pip install 'litllm[serve]'") from None
        from tokenizers import Tokenizer as HFTokenizer
        from transformers import PreTrainedTokenizerFast

        self._xgr = xgr
        if not tokenizer.stop_ids:
            raise LitLLMError("constrained decoding needs a tokenizer with an EOS token (none in the checkpoint's "
                              "tokenizer_config.json / generation_config.json)")
        fast = PreTrainedTokenizerFast(tokenizer_object=HFTokenizer.from_str(tokenizer.processor.to_str()))
        info = xgr.TokenizerInfo.from_huggingface(fast, vocab_size=vocab_size or tokenizer.vocab_size,
                                                  stop_token_ids=list(tokenizer.stop_ids))
        self._compiler = xgr.GrammarCompiler(info)

    def json_schema(self, schema: Optional[dict] = None) -> Grammar:
        """JSON text valid against `schema` (None: any JSON object), without free whitespace between tokens."""
        return Grammar(self._xgr, self._compiler.compile_grammar(self._json_grammar(schema)))

    def _json_grammar(self, schema: Optional[dict]):
        ebnf = str(self._xgr.Grammar.from_json_schema(json.dumps({"type": "object"} if schema is None else schema),
                                                      any_whitespace=False, strict_mode=True))
        # xgrammar 0.2's characters of a length-bounded string (maxLength) let control characters through, which
        # JSON forbids raw (json.loads rejects them): those of its plain strings instead
        return self._xgr.Grammar.from_ebnf(ebnf.replace(_BOUNDED_STRING_CHAR, _JSON_STRING_CHAR))

    def structural(self, begin: str, schema: dict, end: str) -> Grammar:
        """`begin`, then JSON valid against `schema`, then `end` (a forced tool call in its family's wrapping)."""
        g = self._xgr.Grammar
        literal = lambda text: g.from_ebnf(f"root ::= {json.dumps(text)}")  # noqa: E731
        body = self._json_grammar(schema)
        return Grammar(self._xgr, self._compiler.compile_grammar(g.concat(literal(begin), body, literal(end))))
