"""litllm's `GPT` + `Tokenizer` as an lm-eval language model (`lm_eval.api.model.TemplateLM`).

lm-eval asks a model three things:
- `loglikelihood`: log P(continuation | context) and whether greedy decoding would produce it,
- `loglikelihood_rolling`: log P(text) over a whole document, in windows of the context length,
- `generate_until`: text generated after a context until a stop string.

Tokenization mirrors lm-eval's Hugging Face backend (`HFLM`, lm_eval 0.4.x) exactly, so the numbers
can be compared with it request by request:
- a context/continuation pair is encoded together and split (`TemplateLM._encode_pair`, inherited);
  trailing spaces of the context move to the continuation;
- the tokenizer's own special tokens are added (BOS for Llama-style tokenizers) unless the string
  already starts with the BOS text, or `add_bos_token` says otherwise;
- an empty context becomes the prefix token (BOS, else EOS);
- inputs longer than `max_length` lose tokens on the left; generation contexts are left-truncated to
  `max_length - max_gen_toks`.

Speed: loglikelihood requests are deduplicated by model input (multiple-choice questions whose
choices are one token share one forward pass), sorted longest first, right-padded and scored one
forward pass per batch; generation runs on litllm's decode engine (continuous batching of `batch_size` rows).
This module imports lm_eval at import time: import it lazily (litllm.evaluate does).
"""

from __future__ import annotations

import logging
from collections import defaultdict
from pathlib import Path
from typing import Any, Optional

import torch
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs
from tqdm import tqdm

from litllm.errors import LitLLMError
from litllm.engine import Engine, Request, Sampling
from litllm.model import GPT
from litllm.prompts import checkpoint_chat_template, render_chat_template, template_variables
from litllm.scoring import score_tokens
from litllm.tokenizer import Tokenizer

log = logging.getLogger(__name__)

# marks where the last chat message ends (the same marker transformers uses)
_CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "


class LitLLMLM(TemplateLM):
    """An lm-eval `LM` over a loaded litllm model (any family `GPT` supports).

    Args:
        model: the model, already on its device and in its dtype (put in eval mode here).
        tokenizer: its tokenizer.
        batch_size: requests per forward pass.
        max_length: context length in tokens; defaults to the model's `max_seq_length`.
        max_gen_toks: tokens to generate when a task does not say.
        add_bos_token: force BOS on (True) or off (False); None follows the tokenizer, as HFLM does.
        checkpoint_dir: where the model came from (reported in results and used as cache key).
    """

    def __init__(
        self,
        model: GPT,
        tokenizer: Tokenizer,
        batch_size: int = 1,
        max_length: Optional[int] = None,
        max_gen_toks: int = 256,
        add_bos_token: Optional[bool] = None,
        checkpoint_dir: Optional[Path] = None,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise LitLLMError(f"batch_size: expected a positive integer, got {batch_size}")
        if max_length is not None and not 0 < max_length <= model.max_seq_length:
            raise LitLLMError(f"max_length: expected 1..{model.max_seq_length} (the model's context), got {max_length}")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self._batch_size = batch_size
        self._max_length = max_length or model.max_seq_length
        self._max_gen_toks = max_gen_toks
        self.add_bos_token = add_bos_token
        self.checkpoint_dir = checkpoint_dir
        self._device = model.wte.weight.device
        self.vocab_size = model.config.vocab_size  # padded rows of the head are not tokens
        # the BOS a transformers tokenizer declares (tokenizer_config.json / special_tokens_map.json);
        # litllm's Tokenizer also takes generation_config.json's bos_token_id, which HFLM never sees
        declares_bos = "bos_token" in template_variables(Path(tokenizer.checkpoint_dir))
        self._bos_id = tokenizer.bos_id if declares_bos else None
        # the string form of the prefix token: a context that starts with it gets no second BOS
        self._prefix_text = tokenizer.decode([self.prefix_token_id], skip_special_tokens=False)

    # ------------------------------------------------------------------ what lm-eval reads
    @property
    def eot_token_id(self) -> int:
        if self.tokenizer.eos_id is None:
            raise LitLLMError(f"{self.checkpoint_dir}: the tokenizer has no EOS token (lm-eval needs one)")
        return self.tokenizer.eos_id

    @property
    def prefix_token_id(self) -> int:
        # the token an empty context stands for: BOS, else EOS (as in HFLM)
        return self._bos_id if self._bos_id is not None else self.eot_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def tokenizer_name(self) -> str:
        return str(self.checkpoint_dir or "litllm").replace("/", "__")

    def get_model_info(self) -> dict[str, Any]:
        return {
            "model_num_parameters": sum(p.numel() for p in self.model.parameters()),
            "model_dtype": str(self.model.wte.weight.dtype),
            "checkpoint_dir": str(self.checkpoint_dir) if self.checkpoint_dir else None,
            "max_length": self.max_length,
        }

    # ------------------------------------------------------------------ tokenization
    def tok_encode(
        self, string: str, add_special_tokens: Optional[bool] = None, left_truncate_len: Optional[int] = None, **kwargs
    ) -> list[int]:
        """Token ids of `string`, with special tokens decided as HFLM decides them."""
        if add_special_tokens is False:
            ids = self.tokenizer.encode(string, bos=False, eos=False).tolist()
        else:
            bos = self.add_bos_token
            if add_special_tokens is None and self._prefix_text and string.startswith(self._prefix_text):
                bos = False  # the text brings its own BOS
            eos = self.tokenizer.add_eos if bos is not False else False
            ids = self.tokenizer.encode(string, bos=bos, eos=eos).tolist()
        if left_truncate_len:
            ids = ids[-left_truncate_len:]
        return ids

    def tok_decode(self, tokens: list[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

    # ------------------------------------------------------------------ chat templates
    def chat_template(self, chat_template: bool | str = False) -> Optional[str]:
        if not chat_template:
            return None
        template = checkpoint_chat_template(Path(self.checkpoint_dir)) if self.checkpoint_dir else None
        if template is None:
            raise LitLLMError(f"{self.checkpoint_dir}: --apply_chat_template, but the tokenizer has no chat template")
        return template

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """The chat as text, as HFLM renders it (`tokenizer.apply_chat_template(..., tokenize=False)`).

        Without a generation prompt the last message is left open for the model to continue
        (transformers' `continue_final_message`). A template that rejects a system message gets the
        chat without it, as in HFLM.
        """
        try:
            return self._render_chat(chat_history, add_generation_prompt)
        except LitLLMError:
            without_system = [m for m in chat_history if m.get("role") != "system"]
            if len(without_system) == len(chat_history):
                raise
            return self._render_chat(without_system, add_generation_prompt)

    def _render_chat(self, chat_history: list[dict[str, str]], add_generation_prompt: bool) -> str:
        template = self.chat_template(True)
        variables = template_variables(Path(self.checkpoint_dir))
        continue_last = not add_generation_prompt and bool(chat_history)
        messages = [dict(m) for m in chat_history]
        if continue_last:
            # mark the end of the last message, render, and cut the text there
            messages[-1]["content"] = messages[-1]["content"] + _CONTINUE_TAG
        text = render_chat_template(template, messages, add_generation_prompt, **variables)
        if continue_last:
            if _CONTINUE_TAG.strip() not in text:
                raise LitLLMError("chat template: the last message does not appear in the rendered chat")
            cut = text.rindex(_CONTINUE_TAG.strip())
            # a template that trims the message also trimmed the space before the tag
            text = text[:cut] if text[cut : cut + len(_CONTINUE_TAG)] == _CONTINUE_TAG else text[:cut].rstrip()
        return text

    # ------------------------------------------------------------------ scoring
    def _loglikelihood_tokens(
        self, requests: list[tuple[Any, list[int], list[int]]], disable_tqdm: bool = False, **kwargs
    ) -> list[tuple[float, bool]]:
        """(log P(continuation | context), continuation is the greedy one) for each (key, context, continuation)."""
        return score_tokens(
            self.model,
            [(context, continuation) for _, context, continuation in requests],
            batch_size=self.batch_size,
            max_length=self.max_length,
            desc="loglikelihood",
            disable_tqdm=disable_tqdm,
        )

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """log P(text) of whole documents: disjoint windows of max_length tokens, the first after the prefix token."""
        windows: list[tuple[None, list[int], list[int]]] = []
        owner: list[int] = []
        for i, (text,) in enumerate(req.args for req in requests):
            pairs = lm_utils.get_rolling_token_windows(
                token_list=self.tok_encode(text),
                prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length,
                context_len=1,
            )
            for context, continuation in map(lm_utils.make_disjoint_window, pairs):
                windows.append((None, context, continuation))
                owner.append(i)
        scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)
        totals = [0.0] * len(requests)
        for i, (logprob, _) in zip(owner, scores):
            totals[i] += logprob
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # ------------------------------------------------------------------ generation
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Continue each context until one of its stop strings (or EOS), as HFLM does with `model.generate`."""
        results: list[Optional[str]] = [None] * len(requests)
        eos_text = self.tok_decode([self.eot_token_id], skip_special_tokens=False)
        # requests with the same generation settings run together, longest context first
        groups: dict[str, list[int]] = defaultdict(list)
        encoded: list[list[int]] = []
        for i, (context, gen_kwargs) in enumerate(req.args for req in requests):
            groups[repr(sorted(gen_kwargs.items(), key=lambda kv: kv[0]))].append(i)
            encoded.append(self.tok_encode(context))
        bar = tqdm(total=len(requests), desc="generate_until", disable=disable_tqdm)
        for indices in groups.values():
            indices.sort(key=lambda i: (-len(encoded[i]), requests[i].args[0]))
            kwargs = normalize_gen_kwargs(requests[indices[0]].args[1], self.max_gen_toks)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos_text)
            max_new = kwargs.pop("max_gen_toks")
            max_context = self.max_length - max_new
            if max_context <= 0:
                raise LitLLMError(
                    f"max_gen_toks {max_new} must be below max_length {self.max_length} (the model's context)"
                )
            sampling = _sampling(kwargs)
            # the group runs as one continuous batch: a row freed by a finished request takes the next one.
            # Stops: EOS/stop ids, and lm-eval's stop strings matched on the decoded text (a model can spell
            # them with different tokens), cut at the first one as HFLM's postprocessing does
            with Engine(self.model, self.tokenizer, min(self.batch_size, len(indices)), self.max_length) as engine:
                owner = {}
                for i in indices:
                    request = Request(encoded[i][-max_context:], max_new, sampling, until, self.tokenizer.stop_ids)
                    owner[engine.add(request)] = i
                texts = {i: "" for i in indices}
                while engine.has_unfinished:
                    for out in engine.step():
                        i = owner[out.request_id]
                        texts[i] += out.text
                        if out.finished:
                            results[i] = texts[i]
                            self.cache_hook.add_partial("generate_until", requests[i].args, texts[i])
                            bar.update(1)
        bar.close()
        return results  # type: ignore[return-value]


def _sampling(kwargs: dict) -> Sampling:
    """Greedy decoding, or sampling with temperature / top_k / top_p (lm-eval's `do_sample=True`)."""
    kwargs = dict(kwargs)
    do_sample = kwargs.pop("do_sample", False)
    temperature = float(kwargs.pop("temperature", 0.0) or 0.0)
    top_k, top_p = kwargs.pop("top_k", None), kwargs.pop("top_p", None)
    if kwargs:
        log.warning(f"litllm ignores these generation settings: {sorted(kwargs)}")
    if not do_sample or temperature == 0.0:
        return Sampling()
    return Sampling(temperature, int(top_k) if top_k else None, float(top_p) if top_p is not None else 1.0)
