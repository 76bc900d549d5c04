"""`Tokenizer`: the `tokenizers` library's `tokenizer.json`, with special tokens read the way
transformers reads them (`tokenizer_config.json`, `special_tokens_map.json`, `generation_config.json`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

import torch

from litllm.errors import LitLLMError
from litllm.utils import read_json_object


def _token_content(value) -> Optional[str]:
    if isinstance(value, dict):
        return value.get("content")
    return value


class Tokenizer:
    def __init__(self, checkpoint_dir: Union[str, Path]) -> None:
        from tokenizers import Tokenizer as HFTokenizer

        self.checkpoint_dir = Path(checkpoint_dir)
        path = self.checkpoint_dir / "tokenizer.json"
        if not path.is_file():
            from litllm.utils import hub_name_hint

            hint = hub_name_hint(self.checkpoint_dir) or " (a tokenizer is needed here)"
            raise LitLLMError(f"{self.checkpoint_dir}: tokenizer.json not found{hint}")
        try:
            self.processor = HFTokenizer.from_file(str(path))
        except Exception as e:  # the tokenizers library raises a bare Exception on bad files
            raise LitLLMError(f"{path}: not a valid tokenizer.json ({str(e).splitlines()[0][:200]})") from None
        config = read_json_object(self.checkpoint_dir / "tokenizer_config.json")
        special = read_json_object(self.checkpoint_dir / "special_tokens_map.json")
        generation = read_json_object(self.checkpoint_dir / "generation_config.json")

        def token_id(key: str) -> Optional[int]:
            content = _token_content(config.get(key)) or _token_content(special.get(key))
            return self.processor.token_to_id(content) if content is not None else None

        self.bos_id = token_id("bos_token")
        self.eos_id = token_id("eos_token")
        self.pad_id = token_id("pad_token")
        if self.bos_id is None and generation.get("bos_token_id") is not None:
            self.bos_id = generation["bos_token_id"]
        gen_eos = generation.get("eos_token_id")
        gen_eos = [gen_eos] if isinstance(gen_eos, int) else list(gen_eos or [])
        if self.eos_id is None and gen_eos:
            self.eos_id = gen_eos[0]
        # every id that ends a generated turn (Llama-3 instruct ends turns with <|eot_id|>)
        self.stop_ids = sorted({i for i in [self.eos_id, *gen_eos] if i is not None})
        # which special tokens the tokenizer adds by itself: transformers (5.x) follows tokenizer.json's
        # post-processor, whatever `add_bos_token`/`add_eos_token` in tokenizer_config.json say
        plain = self.processor.encode("a", add_special_tokens=False).ids
        probe = self.processor.encode("a", add_special_tokens=True).ids
        self.add_bos = self.bos_id is not None and len(probe) > len(plain) and probe[0] == self.bos_id
        self.add_eos = self.eos_id is not None and len(probe) > len(plain) and probe[-1] == self.eos_id

    @property
    def vocab_size(self) -> int:
        return self.processor.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> Optional[int]:
        return self.processor.token_to_id(token)

    def encode(
        self,
        text: str,
        bos: Optional[bool] = None,
        eos: bool = False,
        device: Optional[torch.device] = None,
        max_length: int = -1,
    ) -> torch.Tensor:
        """Token ids of `text` (1-D long tensor).

        bos=None adds the special tokens the tokenizer itself adds (as transformers' `tokenizer(text)`
        does; `add_bos`/`add_eos` say which); bos=True/False forces BOS on/off. eos=True appends EOS.
        """
        if bos is None:
            ids = self.processor.encode(text, add_special_tokens=True).ids
            if eos and not self.add_eos and self.eos_id is not None:
                ids.append(self.eos_id)
        else:
            ids = self.processor.encode(text, add_special_tokens=False).ids
            if bos and self.bos_id is not None:
                ids.insert(0, self.bos_id)
            if eos and self.eos_id is not None:
                ids.append(self.eos_id)
        if max_length > 0:
            ids = ids[:max_length]
        return torch.tensor(ids, dtype=torch.long, device=device)

    def decode(self, ids: Union[torch.Tensor, list[int]], skip_special_tokens: bool = True) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.reshape(-1).tolist()
        return self.processor.decode(ids, skip_special_tokens=skip_special_tokens)
