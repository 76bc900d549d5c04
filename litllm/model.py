"""The GPT model: one decoder-only transformer that every supported family maps onto.

Reads top to bottom: GPT -> Block -> CausalSelfAttention / MLPs -> norms -> RoPE -> KV cache.
Shape notes: B batch, T query length, L key length, nh query heads, nkv key/value heads,
hs head size, C = n_embd.
"""

from __future__ import annotations

import math
from functools import partial
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch._subclasses.fake_tensor import is_fake  # loaded by `import torch` anyway

from litllm import fused_norms, fused_routing
from litllm.config import Config
from litllm.cpu_ops import bf16_norm_op, eager_fp32_training, plain_tensor
from litllm.fused_experts import fused_experts_available, fused_sparse_experts
from litllm.losses import chunked_cross_entropy, linear_cross_entropy
from litllm.utils import meta_device


class GPT(nn.Module):
    def __init__(self, config: Config) -> None:
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.padded_vocab_size, config.n_embd)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.norm_f = build_norm(config, config.n_embd)
        self.lm_head = nn.Linear(config.n_embd, config.padded_vocab_size, bias=config.lm_head_bias)
        if config.tie_embeddings:
            self.lm_head.weight = self.wte.weight
        self._max_seq_length = config.block_size
        self.build_rope_cache()
        self.router_aux_loss: Optional[torch.Tensor] = None
        """The load-balancing loss (unweighted) of the last training forward with targets (MoE models)."""

    # ------------------------------------------------------------------ RoPE cache
    @property
    def max_seq_length(self) -> int:
        return self._max_seq_length

    @max_seq_length.setter
    def max_seq_length(self, value: int) -> None:
        """Shrink (or grow, up to block_size) the positions the RoPE cache covers."""
        if value > self.config.block_size:
            raise ValueError(f"max_seq_length {value} exceeds the model's block_size {self.config.block_size}")
        self._max_seq_length = value
        self.build_rope_cache()

    def build_rope_cache(self, device: Optional[torch.device] = None) -> None:
        c = self.config
        # on the meta device these are placeholders: loading calls this again on the real device
        device = device or self.wte.weight.device
        caches = {"": (c.rope_base, c.rope_scaling)}
        if c.rope_local_base is not None:  # Gemma-3's sliding-window layers: own base, no scaling
            caches["_local"] = (c.rope_local_base, None)
        if c.rope_scaling and c.rope_scaling.get("rope_type") == "longrope":
            # LongRoPE: short factors while a sequence fits the original context, long ones beyond it
            caches["_short"] = (c.rope_base, dict(c.rope_scaling, long_factor=c.rope_scaling["short_factor"]))
        for suffix, (base, scaling) in caches.items():
            cos, sin = rope_cache(self._max_seq_length, c.rope_n_elem, base, scaling, device)
            self.register_buffer(f"rope_cos{suffix}", cos, persistent=False)
            self.register_buffer(f"rope_sin{suffix}", sin, persistent=False)

    # ------------------------------------------------------------------ entry points
    def forward(
        self,
        idx: torch.Tensor,
        input_pos: Optional[torch.Tensor] = None,
        targets: Optional[torch.Tensor] = None,
        *,
        key_padding_mask: Optional[torch.Tensor] = None,
        document_ids: Optional[torch.Tensor] = None,
        ignore_index: int = -100,
        logits_to_keep: Optional[int] = None,
        attention_masks: Optional[dict[bool, torch.Tensor]] = None,
    ) -> torch.Tensor:
        """Training and scoring: logits `(B, T, padded_vocab)`, or the mean cross-entropy when `targets` is given.

        Decoding with a KV cache goes through `decode` (a cache set here is used as `decode` uses it).

        idx: (B, T) token ids.
        input_pos: (B, T) or (T,) RoPE position of each token (default arange(T)).
        key_padding_mask: (B, T) True where a key may be attended to (False on left padding).
        document_ids: (B, T) which sample of a packed row each token belongs to: a token attends
            only to earlier tokens of its own document (block-diagonal causal attention). Pass `input_pos`
            restarting at each document with it, and the row computes what each sample computes alone.
        targets: (B, T) the next token of each position (`ignore_index`: no loss).
        logits_to_keep: return the logits of the last this many positions only, (B, logits_to_keep, padded_vocab).
        attention_masks: {is a local layer: (B, 1, T, T) bool, True = attend} in place of the masks the arguments
            above make, for layouts they can't say (GRPO's prompt shared by its completions: `litllm.grpo.prefix`).
        """
        x = self._hidden_states(idx, input_pos, key_padding_mask, document_ids, kv_len=None, masks=attention_masks)
        if targets is None:
            return self._logits(x, logits_to_keep)
        c = self.config
        loss = self.head_loss(self.norm_f(x), targets, ignore_index)
        if self.training and c.router_aux_loss_coef and c.is_moe_model:
            # transformers' `loss + router_aux_loss_coef * aux_loss`; the term alone is kept for logging
            routers = [m for m in self.modules() if isinstance(m, MoE)]
            aux = load_balancing_loss([m.router_stats for m in routers], c.n_expert)
            for m in routers:
                m.router_stats = None
            self.router_aux_loss = aux.detach()
            loss = loss + c.router_aux_loss_coef * aux
        return loss

    def decode(
        self,
        idx: torch.Tensor,
        input_pos: torch.Tensor,
        *,
        kv_len: Optional[int] = None,
        logits_to_keep: Optional[int] = None,
    ) -> torch.Tensor:
        """Decoding with the KV cache (`set_kv_cache`): write `idx` at `input_pos`, return logits `(B, T, padded_vocab)`.

        idx: (B, T) token ids (a prompt chunk to prefill, or one new token per row).
        input_pos: (B, T) or (T,) position of each token: its RoPE position and the cache slot it is
            written to, so every row may sit at its own length. A query attends to the cached keys at
            positions <= its own.
        kv_len: attend only to the cache's first `kv_len` positions: a bound on every row's
            newest position + 1 that the caller knows on the host (eager decoding skips the unwritten
            tail; a compiled step's is symbolic: `litllm.compile_decode.attended_length`). None: the whole
            cache, a static shape for torch.compile. No host sync either way.
        logits_to_keep: return the logits of the last this many positions only, (B, logits_to_keep, padded_vocab):
            a prefill needs only the last one, and the head over a long prompt costs as much as several layers.
        """
        if self.blocks[0].attn.kv_cache is None:
            raise ValueError("no KV cache is set: call set_kv_cache before decode")
        if input_pos.dim() == 2 and idx.size(0) == 1:
            input_pos = input_pos[0]  # one row: (T,) once per step rather than in each layer's cache write
        return self._logits(self._hidden_states(idx, input_pos, None, None, kv_len), logits_to_keep)

    # ------------------------------------------------------------------ the shared blocks
    def _logits(self, x: torch.Tensor, logits_to_keep: Optional[int]) -> torch.Tensor:
        if logits_to_keep is not None:
            x = x[:, -logits_to_keep:]  # (B, logits_to_keep, C)
        return self.head(self.norm_f(x))

    def _hidden_states(
        self,
        idx: torch.Tensor,
        input_pos: Optional[torch.Tensor],
        key_padding_mask: Optional[torch.Tensor],
        document_ids: Optional[torch.Tensor],
        kv_len: Optional[int],
        masks: Optional[dict[bool, Optional[torch.Tensor]]] = None,
    ) -> torch.Tensor:
        """Embed `idx` and run every block: the last hidden states (B, T, C), before the final norm."""
        B, T = idx.shape
        c = self.config
        cached = self.blocks[0].attn.kv_cache is not None
        if cached and input_pos is None:
            raise ValueError("a KV cache is set: pass input_pos")
        if input_pos is None and T > self._max_seq_length:
            raise ValueError(f"sequence of length {T} exceeds max_seq_length {self._max_seq_length}")
        positions = input_pos if input_pos is not None else torch.arange(T, device=idx.device)
        rope, rope_local = self._rope(positions)
        if cached and document_ids is not None:
            raise ValueError("document_ids (packed rows) are for training and scoring, not for a KV cache")
        if masks is None:
            masks = self._attention_masks(T, idx.device, input_pos if cached else None, key_padding_mask, kv_len,
                                          document_ids)

        x = self.wte(idx)  # (B, T, C)
        if c.scale_embeddings:
            x = x * torch.tensor(c.n_embd**0.5, dtype=x.dtype)
        if c.embedding_multiplier != 1.0:
            x = x * c.embedding_multiplier
        for i, block in enumerate(self.blocks):
            sliding = c.is_sliding(i)
            layer_rope = (rope_local if sliding else rope) if c.uses_rope(i) else None
            x = block(x, layer_rope, masks[sliding or c.is_chunked(i)], input_pos, kv_len)
        return x

    def _rope(self, positions: torch.Tensor) -> tuple[tuple, tuple]:
        """`(rope, rope_local)`: (cos, sin[, query scale]) at `positions` (T,) or (B, T), for global and local layers;
        cos/sin (T, n) or (B, 1, T, n)."""
        c = self.config
        cos, sin = self.rope_cos[positions], self.rope_sin[positions]  # (T, n) or (B, T, n)
        if c.rope_scaling and c.rope_scaling.get("rope_type") == "longrope":
            # short factors while a row's positions fit the original context (HF decides on the max
            # position of the forward pass; per row here, the same for one row) -- chosen on the device
            short = positions.amax(dim=-1, keepdim=True) < c.rope_scaling["original_max_position_embeddings"]
            cos = torch.where(short[..., None], self.rope_cos_short[positions], cos)
            sin = torch.where(short[..., None], self.rope_sin_short[positions], sin)
        # once per forward rather than once per layer: in the activations' dtype, and (B, 1, T, n) for per-row positions
        dtype = self.wte.weight.dtype if self.wte.weight.is_floating_point() else cos.dtype

        def ready(t: torch.Tensor) -> torch.Tensor:  # (no `to` op where the dtype is already right: one op less a step)
            t = t[:, None] if t.dim() == 3 else t
            return t if t.dtype == dtype else t.to(dtype)

        rope = (ready(cos), ready(sin))
        if c.query_scale_beta is not None:  # a third entry: the query scale per position, (T,) or (B, T)
            rope = (*rope, 1 + c.query_scale_beta * torch.log1p(torch.floor(positions / c.query_scale_length)))
        rope_local = rope
        if c.rope_local_base is not None:
            rope_local = (ready(self.rope_cos_local[positions]), ready(self.rope_sin_local[positions]), *rope[2:])
        return rope, rope_local

    def head_loss(self, x: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
        """The mean next-token loss of the final hidden states after `norm_f`, x (B, T, C), against targets (B, T)."""
        if self._fused_loss_applies(x):
            return linear_cross_entropy(x, self.lm_head.weight, self.lm_head.bias, targets, ignore_index)
        return chunked_cross_entropy(self.head, x, targets, ignore_index)

    def _fused_loss_applies(self, x: torch.Tensor) -> bool:
        """Whether the training loss takes `linear_cross_entropy` (the same loss in 1.45x less CPU time for head +
        loss in `benchmarks/moe.py`, no (B, T, V) tensor made) instead of `head` + `chunked_cross_entropy`: fp32 on
        the CPU (where it was measured), with gradients to make; a plain Linear head with no logit divisor or
        softcap, its weight an ordinary tensor (not a DTensor or quantized; fake CPU tensors take it as real ones
        do, so `litllm estimate` measures the path the step runs) and no hooks on it (FSDP, LoRA wrappers and
        adapters keep the module call); no autocast, not under torch.compile. And only where it keeps no more
        memory than the head path: it holds the head's weight gradient (V, C) from the forward on, where the head
        path keeps the (N, V) log-probabilities, so a trainable head takes it for N >= C tokens only.
        x: (B, T, C) final hidden states."""
        c, head = self.config, self.lm_head
        if type(head) is not nn.Linear or has_hooks(head):
            return False
        weight = head.weight
        return (x.device.type == "cpu" and x.dtype == weight.dtype == torch.float32 and torch.is_grad_enabled()
                and not torch.compiler.is_compiling() and not torch.is_autocast_enabled("cpu")
                and (type(weight.data) is torch.Tensor or is_fake(weight)) and c.logits_divisor == 1.0
                and c.final_logit_softcapping is None
                and (not weight.requires_grad or x.numel() // x.size(-1) >= x.size(-1)))  # (tokens >= C)

    def head(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(x)
        if self.config.logits_divisor != 1.0:
            logits = logits / self.config.logits_divisor
        if self.config.final_logit_softcapping is not None:
            logits = softcap(logits, self.config.final_logit_softcapping)
        return logits

    def _attention_masks(
        self,
        T: int,
        device: torch.device,
        cache_pos: Optional[torch.Tensor],
        key_padding_mask: Optional[torch.Tensor],
        kv_len: Optional[int],
        document_ids: Optional[torch.Tensor] = None,
    ) -> dict[bool, Optional[torch.Tensor]]:
        """Boolean masks (B|1, 1, T, L), True = attend, keyed by "is this a local layer" (a sliding window, or
        Llama 4's chunks: a query sees the keys of its own `attention_chunk_size` block of positions).

        Without a cache, causality is by index in the sequence; with one (`cache_pos` (B, T) or (T,)),
        by position: a query sees the cache slots at positions <= its own, at a size fixed by the cache
        (or `kv_len`), never by a length read back from the device. None stands for a plain causal
        mask, which SDPA applies itself (`is_causal=True`). `document_ids` (B, T) make it block-diagonal:
        a query sees only keys of its own document. Sliding windows count positions in the row, which
        within one document are its positions. On CUDA, packed rows get FlexAttention BlockMasks instead.
        """
        window, chunk = self.config.sliding_window_size, self.config.attention_chunk_size
        if document_ids is not None and key_padding_mask is None and use_flex_attention(device):
            full = document_block_mask(document_ids)
            return {False: full, True: full if window is None else document_block_mask(document_ids, window)}
        plain = cache_pos is None and key_padding_mask is None and document_ids is None
        if plain and window is None and chunk is None:
            return {False: None, True: None}
        if cache_pos is None:
            q_pos = torch.arange(T, device=device)
            L = T
        else:
            q_pos = cache_pos
            L = kv_len or self.blocks[0].attn.kv_cache.k.size(2)
        k_pos = torch.arange(L, device=device)

        def per_head(t: torch.Tensor) -> torch.Tensor:  # (T, L) or (B, T, L) -> (B|1, 1, T, L)
            return t[:, None] if t.dim() == 3 else t[None, None]

        distance = per_head(q_pos[..., None] - k_pos)  # (B|1, 1, T, L)
        causal = distance >= 0
        if key_padding_mask is not None:
            causal = causal & key_padding_mask[:, None, None, :L]
        if document_ids is not None:
            causal = causal & (document_ids[:, None, :, None] == document_ids[:, None, None, :])  # (B, 1, T, T)
        masks: dict[bool, Optional[torch.Tensor]] = {False: None if plain else causal, True: causal}
        if window is not None:
            masks[True] = causal & (distance < window)
        if chunk is not None:  # (a model has a window or chunks, not both)
            masks[True] = causal & per_head((q_pos[..., None] // chunk) == (k_pos // chunk))
        return masks

    # ------------------------------------------------------------------ KV cache
    def set_kv_cache(
        self,
        batch_size: int,
        max_seq_length: Optional[int] = None,
        device: Optional[torch.device] = None,
        dtype: Optional[torch.dtype] = None,
    ) -> None:
        """Preallocate a KV cache per block for `batch_size` rows and `max_seq_length` positions."""
        max_seq_length = max_seq_length or self._max_seq_length
        if max_seq_length > self._max_seq_length:
            raise ValueError(f"KV cache length {max_seq_length} exceeds max_seq_length {self._max_seq_length}")
        device = device or self.wte.weight.device
        dtype = dtype or self.wte.weight.dtype
        c = self.config
        for block in self.blocks:
            if isinstance(block.attn, MLAttention):  # the latent and the rotary key: one "kv head" each
                k = torch.zeros(batch_size, 1, max_seq_length, c.kv_lora_rank, device=device, dtype=dtype)
                block.attn.kv_cache = KVCache(k, torch.zeros_like(k[..., : c.qk_rope_head_dim]))
                continue
            n_kv = block.attn.config.n_query_groups  # the block's own: a tensor-parallel rank holds n_query_groups / N
            block.attn.kv_cache = KVCache.allocate(batch_size, n_kv, max_seq_length, c.head_size, device, dtype)

    def clear_kv_cache(self) -> None:
        for block in self.blocks:
            block.attn.kv_cache = None

    # ------------------------------------------------------------------ init / loading
    @torch.no_grad()
    def reset_parameters(self) -> None:
        """GPT-NeoX/TinyLlama initialization for training from scratch."""
        c = self.config
        std = math.sqrt(2.0 / (5 * c.n_embd))
        for name, module in self.named_modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                # output projections are scaled down with depth (GPT-NeoX "small_init" + "wang_init")
                out_proj = name.endswith(".proj")
                nn.init.normal_(module.weight, mean=0.0, std=(1 / math.sqrt(c.n_embd) / c.n_layer) if out_proj else std)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, (RMSNorm, nn.LayerNorm, StackedLinear)):
                module.reset_parameters()
            elif isinstance(module, CausalSelfAttention) and module.sinks is not None:
                nn.init.zeros_(module.sinks)
        self.build_rope_cache()

    @classmethod
    def from_checkpoint(
        cls,
        checkpoint_dir: str | Path,
        device: str | torch.device = "cpu",
        dtype: Optional[torch.dtype] = None,
        **config_overrides,
    ) -> "GPT":
        """Load a converted model folder (`lit_model.safetensors` + `model_config.yaml`)."""
        from litllm.model_folder import load_model_weights
        from litllm.model_folder import check_model_folder

        checkpoint_dir = check_model_folder(checkpoint_dir)
        config = Config.from_checkpoint(checkpoint_dir, **config_overrides)
        with meta_device():
            model = cls(config)
        load_model_weights(model, checkpoint_dir / "lit_model.safetensors", device=device, dtype=dtype)
        return model


class Block(nn.Module):
    def __init__(self, config: Config, layer_idx: int) -> None:
        super().__init__()
        c = config
        self.config = config
        self.norm_1 = build_norm(c, c.n_embd) if c.pre_norm else nn.Identity()
        self.attn = (MLAttention if c.kv_lora_rank else CausalSelfAttention)(c, layer_idx)
        self.post_attn_norm = build_norm(c, c.n_embd) if c.post_attention_norm else nn.Identity()
        needs_norm_2 = c.pre_norm and not (c.parallel_residual and c.shared_attention_norm)
        self.norm_2 = build_norm(c, c.n_embd) if needs_norm_2 else nn.Identity()
        self.mlp = build_mlp(c, layer_idx)
        self.post_mlp_norm = build_norm(c, c.n_embd) if c.post_mlp_norm else nn.Identity()

    def forward(self, x, rope, mask, input_pos, kv_len=None):
        """rope: (cos, sin) for this layer, or None for a layer without positional encoding."""
        c = self.config
        x_normed = self.norm_1(x)
        h = self.attn(x_normed, rope, mask, input_pos, kv_len)
        if c.post_attention_norm:  # (an Identity module otherwise: its call is skipped, as each one counts when decoding)
            h = self.post_attn_norm(h)
        m = c.residual_multiplier
        if c.parallel_residual:
            mlp_in = x_normed if c.shared_attention_norm else self.norm_2(x)
            h = h + self._post_mlp(self.mlp(mlp_in))
            return x + (h * m if m != 1.0 else h)
        if m == 1.0 and type(self.norm_2) is RMSNorm:
            x, x_normed = self.norm_2.residual_forward(x, h)  # (one kernel each way where fused norms apply)
        else:
            x = x + (h * m if m != 1.0 else h)
            x_normed = self.norm_2(x)
        h = self._post_mlp(self.mlp(x_normed))
        return x + (h * m if m != 1.0 else h)

    def _post_mlp(self, h: torch.Tensor) -> torch.Tensor:
        return self.post_mlp_norm(h) if self.config.post_mlp_norm else h


class CausalSelfAttention(nn.Module):
    def __init__(self, config: Config, layer_idx: int) -> None:
        super().__init__()
        c = config
        self.config = config
        self.layer_idx = layer_idx
        q_size, kv_size = c.n_head * c.head_size, c.n_query_groups * c.head_size
        self.qkv_sizes = (q_size, kv_size, kv_size)
        # one fused projection: rows are [all query heads | all key heads | all value heads]
        self.qkv = nn.Linear(c.n_embd, q_size + 2 * kv_size, bias=c.attn_bias)
        self.proj = nn.Linear(q_size, c.n_embd, bias=c.attn_out_bias)
        if c.norm_qk == "head":
            self.q_norm, self.k_norm = build_norm(c, c.head_size), build_norm(c, c.head_size)
        elif c.norm_qk == "full":
            self.q_norm, self.k_norm = build_norm(c, q_size), build_norm(c, kv_size)
        # gpt-oss: one learned logit per query head in each softmax's denominator
        self.sinks = nn.Parameter(torch.zeros(c.n_head)) if c.attention_sinks else None
        self.kv_cache: Optional[KVCache] = None
        # optional extra attention branch, e.g. LLaMA-Adapter's gated prefix (set by litllm/adapter.py):
        # called as adapter(q, self) and returns a (B, nh, T, hs) term added to the attention output
        self.adapter: Optional[nn.Module] = None

    def forward(self, x, rope, mask, input_pos, kv_len=None):
        c = self.config
        B, T, _ = x.shape
        q, k, v = self.heads(self.qkv(x), rope)  # (B, nh, T, hs), (B, nkv, T, hs), (B, nkv, T, hs)
        if c.norm_qk == "l2" and rope is not None:  # Llama 4: weightless RMSNorm, RoPE layers only
            q, k = l2_norm(q, c.norm_eps), l2_norm(k, c.norm_eps)
        if c.nope_attn_scale is not None and rope is None:
            q = q * nope_temperature(c, input_pos, T, q.device).to(q.dtype)
        if rope is not None and len(rope) == 3:  # position-dependent query scale (see Config.query_scale_beta)
            q = q * rope[2][..., None, :, None].to(q.dtype)  # (T,) -> (1, T, 1), (B, T) -> (B, 1, T, 1)

        cache = self.kv_cache
        if cache is not None:
            k, v = cache.update(input_pos, k, v, kv_len)  # (B, nkv, L, hs)

        scale = c.attention_multiplier or 1.0 / math.sqrt(c.attention_scores_scalar or c.head_size)
        y = attention(q, k, v, mask, scale, c.attention_logit_softcapping, self.sinks)  # (B, nh, T, hs)
        if self.adapter is not None:
            y = y + self.adapter(q, self)
        if T == 1 and y.is_contiguous():  # (B, nh, 1, hs) is already (B, 1, nh * hs) in memory
            return self.proj(y.view(B, T, c.n_head * c.head_size))
        y = y.transpose(1, 2).reshape(B, T, c.n_head * c.head_size)
        return self.proj(y)

    def heads(self, qkv: torch.Tensor, rope: Optional[tuple]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The fused projection's output qkv (B, T, (nh + 2 nkv) hs) as query, key and value heads, q (B, nh, T, hs) and
        k, v (B, nkv, T, hs), q and k normed (`norm_qk` "full" or "head") and rotated (`rope`: (cos, sin[, scale]) or
        None)."""
        c = self.config
        B, T, _ = qkv.shape
        if T == 1 and c.norm_qk is None and not c.rope_interleaved and c.rope_n_elem > 0 and rope is not None:
            # one token (decoding): rotate the query and key heads together, straight from the projection's output
            nh, nkv = c.n_head, c.n_query_groups
            heads = qkv.view(B, nh + 2 * nkv, 1, c.head_size)  # (B, nh + 2 nkv, 1, hs)
            qk, v = heads.split_with_sizes((nh + nkv, nkv), dim=1)  # (one op where two slices are two)
            q, k = apply_rope(qk, *rope[:2]).split_with_sizes((nh, nkv), dim=1)
            return q, k, v
        if self._fused_qk_applies(qkv, rope):
            # training: qk-norm and RoPE in one kernel each way, straight from the projection's rows
            weights = (self.q_norm.weight, self.k_norm.weight) if c.norm_qk else (None, None)
            q, k, v = fused_norms.qk_norm_rope(qkv, *weights, *rope, c.n_head, c.n_query_groups, c.norm_eps)
            return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, T, hs) views
        q, k, v = qkv.split(self.qkv_sizes, dim=-1)
        if c.norm_qk == "full":
            q, k = self.q_norm(q), self.k_norm(k)
        q = q.view(B, T, c.n_head, c.head_size)  # (B, T, nh, hs)
        k = k.view(B, T, c.n_query_groups, c.head_size)  # (B, T, nkv, hs)
        if c.norm_qk == "head":
            # before the transpose, on the projection's rows, so that the norm's ops walk memory in order (the
            # same values; at `benchmarks/moe.py`'s shapes forward + backward took 1.9-2.1 CPU-ms in place of
            # 2.6-2.8 on the transposed views, in two of three runs)
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)  # (B, nh, T, hs), (B, nkv, T, hs)
        v = v.view(B, T, c.n_query_groups, c.head_size).transpose(1, 2)  # (B, nkv, T, hs)
        if c.rope_interleaved:  # pairs -> halves, the same for q and k: their dot products are unchanged
            q, k = deinterleave(q), deinterleave(k)
        if c.rope_n_elem > 0 and rope is not None:
            cos, sin = rope[:2]
            q, k = apply_rope_qk(q, k, cos, sin)
        return q, k, v

    def _fused_qk_applies(self, qkv: torch.Tensor, rope: Optional[tuple]) -> bool:
        """Whether `fused_norms.qk_norm_rope` computes this layer's q, k, v: training (no KV cache; `fused_norms.applies`)
        with RoPE over whole heads in halves (cos, sin only), and no qk-norm or per-head RMSNorms (qwen3's) with the
        model's eps, plain weights and no hooks."""
        c = self.config
        if rope is None or len(rope) != 2 or c.rope_interleaved or c.rope_n_elem != c.head_size \
                or self.kv_cache is not None or c.norm_qk not in (None, "head"):
            return False
        if c.norm_qk is None:
            return fused_norms.applies(qkv)
        q_norm, k_norm = self.q_norm, self.k_norm
        return (type(q_norm) is RMSNorm and type(k_norm) is RMSNorm and not q_norm.unit_offset
                and not has_hooks(q_norm) and not has_hooks(k_norm)
                and q_norm.eps == k_norm.eps == c.norm_eps and fused_norms.applies(qkv, q_norm.weight, k_norm.weight))


MLA_ABSORB_MAX_QUERIES = 16
"""With a KV cache, MLA attends in the latent space (absorbed) for up to this many new tokens per row (decode);
longer chunks (prefill) up-project the cached latents to keys and values, which costs fewer FLOPs when
queries are about as many as keys."""


class MLAttention(nn.Module):
    """Multi-head Latent Attention (DeepSeek-V2/V3).

    Queries: `q(x)`, or through a low-rank latent `q(q_norm(q_a(x)))` when `q_lora_rank` is set. Keys and
    values: `kv_a(x)` gives a latent (kv_lora_rank) and one rotary key shared by every head (qk_rope_head_dim);
    `kv_b(kv_norm(latent))` up-projects the latent to each head's non-rotary key part and its value. Each
    query/key head is [qk_nope_head_dim | qk_rope_head_dim]; RoPE rotates the second part only (adjacent
    pairs when `rope_interleaved`). Scores are scaled by head_size^-0.5 times YaRN's mscale(mscale_all_dim)^2.

    The KV cache holds the normed latent and the rotated shared key only: `KVCache.k` (B, 1, L, kv_lora_rank),
    `KVCache.v` (B, 1, L, qk_rope_head_dim), (kv_lora_rank + qk_rope_head_dim) values per token, not the
    n_head * (head_size + v_head_dim) of full keys and values. Decoding absorbs `kv_b` into the query and the
    output (attention runs on the latents, like one key/value head of size kv_lora_rank + rope dims);
    training and long chunks up-project the latents to keys and values.
    """

    def __init__(self, config: Config, layer_idx: int) -> None:
        super().__init__()
        c = config
        self.config = config
        self.layer_idx = layer_idx
        self.nope_size = c.head_size - c.qk_rope_head_dim
        if c.q_lora_rank:
            self.q_a = nn.Linear(c.n_embd, c.q_lora_rank, bias=c.attn_bias)
            self.q_norm = RMSNorm(c.q_lora_rank, eps=1e-6)
        self.q = nn.Linear(c.q_lora_rank or c.n_embd, c.n_head * c.head_size, bias=False)
        self.kv_a = nn.Linear(c.n_embd, c.kv_lora_rank + c.qk_rope_head_dim, bias=c.attn_bias)
        self.kv_norm = RMSNorm(c.kv_lora_rank, eps=1e-6)
        self.kv_b = nn.Linear(c.kv_lora_rank, c.n_head * (self.nope_size + c.v_head_dim), bias=False)
        self.proj = nn.Linear(c.n_head * c.v_head_dim, c.n_embd, bias=c.attn_out_bias)
        self.scale = mla_softmax_scale(c)
        self.kv_cache: Optional[KVCache] = None
        self.adapter: Optional[nn.Module] = None  # (LLaMA-Adapter is not supported on MLA)

    def forward(self, x, rope, mask, input_pos, kv_len=None):
        c = self.config
        B, T, _ = x.shape
        q = self.q(self.q_norm(self.q_a(x))) if c.q_lora_rank else self.q(x)
        q = q.view(B, T, c.n_head, c.head_size).transpose(1, 2)  # (B, nh, T, hs)
        q_nope, q_rope = q.split([self.nope_size, c.qk_rope_head_dim], dim=-1)
        latent, k_rope = self.kv_a(x).split([c.kv_lora_rank, c.qk_rope_head_dim], dim=-1)
        latent, k_rope = self.kv_norm(latent)[:, None], k_rope[:, None]  # (B, 1, T, kv_lora_rank), (B, 1, T, rope)
        if rope is not None:
            cos, sin = rope[:2]
            if c.rope_interleaved:  # pairs (x0, x1), (x2, x3)... -> halves [x0, x2, ... | x1, x3, ...]
                q_rope, k_rope = deinterleave(q_rope), deinterleave(k_rope)
            q_rope, k_rope = apply_rope(q_rope, cos, sin), apply_rope(k_rope, cos, sin)
        if self.kv_cache is not None:
            latent, k_rope = self.kv_cache.update(input_pos, latent, k_rope, kv_len)  # (B, 1, L, ...)
        if self.kv_cache is not None and T <= MLA_ABSORB_MAX_QUERIES:
            y = self.absorbed_attention(q_nope, q_rope, latent, k_rope, mask)
        else:
            y = self.expanded_attention(q_nope, q_rope, latent, k_rope, mask)
        return self.proj(y.transpose(1, 2).reshape(B, T, c.n_head * c.v_head_dim))

    def expanded_attention(self, q_nope, q_rope, latent, k_rope, mask) -> torch.Tensor:
        """Up-project the latents (B, 1, L, kv_lora_rank) to every head's keys and values; (B, nh, T, v_head_dim)."""
        c = self.config
        B, _, L, _ = latent.shape
        kv = self.kv_b(latent[:, 0]).view(B, L, c.n_head, self.nope_size + c.v_head_dim).transpose(1, 2)
        k_nope, v = kv.split([self.nope_size, c.v_head_dim], dim=-1)  # (B, nh, L, nope), (B, nh, L, v)
        k = torch.cat((k_nope, k_rope.expand(-1, c.n_head, -1, -1)), dim=-1)  # (B, nh, L, hs)
        return attention(torch.cat((q_nope, q_rope), dim=-1), k, v, mask, self.scale, None)

    def absorbed_attention(self, q_nope, q_rope, latent, k_rope, mask) -> torch.Tensor:
        """Attention on the latents themselves: kv_b's key rows folded into the query, its value rows applied
        after; one shared key/value head of the cache's width. (B, nh, T, v_head_dim)."""
        c = self.config
        # a plain Linear or a kernel choice on its own weight (`multiplies_by_weight`: litllm.cpu_layout, row_split)
        # multiplies by `.weight`; a LoRA/quantized kv_b's effective weight is its product with the identity
        plain = type(self.kv_b) is nn.Linear or getattr(self.kv_b, "multiplies_by_weight", False)
        w = self.kv_b.weight if plain else self.kv_b(
            torch.eye(c.kv_lora_rank, device=latent.device, dtype=latent.dtype)).T
        w = w.view(c.n_head, self.nope_size + c.v_head_dim, c.kv_lora_rank)
        w_k, w_v = w[:, : self.nope_size], w[:, self.nope_size:]  # (nh, nope, r_kv), (nh, v, r_kv)
        q = torch.cat((q_nope @ w_k, q_rope), dim=-1)  # (B, nh, T, kv_lora_rank + rope)
        k = torch.cat((latent, k_rope), dim=-1)  # (B, 1, L, kv_lora_rank + rope)
        y = attention(q, k, latent, mask, self.scale, None)  # (B, nh, T, kv_lora_rank)
        return y @ w_v.transpose(1, 2)  # (B, nh, T, v)


def mla_softmax_scale(config: Config) -> float:
    """head_size^-0.5, times YaRN's mscale(factor, mscale_all_dim)^2 (DeepSeek scales all dimensions' scores,
    not only the rotary ones, as transformers' `yarn_apply_mscale` does)."""
    scale = config.head_size**-0.5
    scaling = config.rope_scaling or {}
    m_all = scaling.get("mscale_all_dim")
    if scaling.get("rope_type", scaling.get("type")) not in (None, "default") and m_all and scaling["factor"] > 1:
        mscale = 0.1 * m_all * math.log(scaling["factor"]) + 1.0
        scale *= mscale * mscale
    return scale


def deinterleave(x: torch.Tensor) -> torch.Tensor:
    """(..., n) with rotary pairs adjacent -> their first elements, then their second ones (rotate-half layout)."""
    return torch.cat((x[..., 0::2], x[..., 1::2]), dim=-1)


def l2_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm without a weight over the last dim, computed in fp32 (Llama 4's qk-norm)."""
    return F.rms_norm(x.float(), (x.size(-1),), eps=eps).to(x.dtype)


def nope_temperature(c: Config, input_pos: Optional[torch.Tensor], T: int, device: torch.device) -> torch.Tensor:
    """Llama 4's attention temperature of NoPE layers: a query scale that grows with its position, broadcastable
    over (B, nh, T, hs). Positions: input_pos ((T,) or (B, T)), or 0..T-1."""
    pos = input_pos if input_pos is not None else torch.arange(T, device=device)
    scale = 1 + c.nope_attn_scale * torch.log1p(torch.floor((pos.float() + 1.0) / c.nope_floor_scale))
    return scale[..., None, :, None]  # (T,) -> (1, T, 1), (B, T) -> (B, 1, T, 1)


def attention(q, k, v, mask: Optional[torch.Tensor], scale: float, logit_softcap: Optional[float],
              sinks: Optional[torch.Tensor] = None) -> torch.Tensor:
    """q: (B, nh, T, hs), k/v: (B, nkv, L, hs), mask: (B|1, 1, T, L) bool or None (= causal), or a
    FlexAttention BlockMask (packed rows on CUDA, see `document_block_mask`). sinks: (nh,) logits that join
    each softmax's denominator and attend to no value (gpt-oss), or None."""
    n_rep = q.size(1) // k.size(1)
    if mask is not None and not isinstance(mask, torch.Tensor):  # a BlockMask
        return flex_attention(q, k, v, mask, scale, logit_softcap, sinks)
    if q.size(2) == 1 and q.device.type == "cpu":
        return single_query_attention(q, k, v, mask, scale, logit_softcap, sinks)
    if logit_softcap is None and sinks is None:
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None, scale=scale, enable_gqa=n_rep > 1
        )
    # SDPA can't softcap scores (Gemma-2) nor add sinks (gpt-oss): compute them explicitly
    if n_rep > 1:
        k, v = k.repeat_interleave(n_rep, dim=1), v.repeat_interleave(n_rep, dim=1)
    scores = (q @ k.transpose(-2, -1)) * scale  # (B, nh, T, L)
    if logit_softcap is not None:
        scores = softcap(scores, logit_softcap)
    if mask is None:
        T, L = scores.shape[-2:]
        mask = torch.ones(T, L, dtype=torch.bool, device=q.device).tril(diagonal=L - T)
    scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    return softmax_with_sinks(scores, sinks[:, None] if sinks is not None else None).to(q.dtype) @ v


def softmax_with_sinks(scores: torch.Tensor, sinks: Optional[torch.Tensor]) -> torch.Tensor:
    """fp32 softmax over the last dim of scores (..., nh-shaped dims, L); with sinks (shaped to broadcast against
    scores[..., :1], one per head), each row's denominator also holds exp(sink), which no value stands behind."""
    if sinks is None:  # (fp32 scores: no dtype argument, which costs a `to` op per call)
        return scores.softmax(-1) if scores.dtype == torch.float32 else torch.softmax(scores, -1, dtype=torch.float32)
    scores = scores.float()
    sink = sinks.float()[..., None].expand(*scores.shape[:-1], 1)
    return torch.softmax(torch.cat([scores, sink], dim=-1), dim=-1)[..., :-1]


def use_flex_attention(device: torch.device) -> bool:
    """Packed rows attend through FlexAttention on CUDA (it skips the blocks between documents); elsewhere
    through SDPA with a boolean (B, 1, T, T) mask."""
    return device.type == "cuda"


def document_block_mask(document_ids: torch.Tensor, window: Optional[int] = None):
    """FlexAttention BlockMask of causal attention within each document of `document_ids` (B, T), and
    within `window` positions when given."""
    from torch.nn.attention.flex_attention import create_block_mask

    def same_document_causal(b, h, q, k):
        keep = (document_ids[b, q] == document_ids[b, k]) & (q >= k)
        return keep & (q - k < window) if window is not None else keep

    B, T = document_ids.shape
    return create_block_mask(same_document_causal, B, None, T, T, device=document_ids.device)


_compiled_flex = None


def flex_attention(q, k, v, block_mask, scale: float, logit_softcap: Optional[float],
                   sinks: Optional[torch.Tensor] = None) -> torch.Tensor:
    """FlexAttention of q (B, nh, T, hs) on k/v (B, nkv, T, hs) under `block_mask`, scores softcapped if asked.
    Compiled on first use on CUDA (its fused kernel); eager elsewhere (a reference, used by the CPU tests).
    Sinks (nh,): softmax(s) over keys becomes softmax over keys + sink = out * sigmoid(lse - sink), from
    the log-sum-exp FlexAttention returns."""
    global _compiled_flex
    from torch.nn.attention import flex_attention as flex

    fn = flex.flex_attention
    if q.device.type == "cuda":
        if _compiled_flex is None:
            _compiled_flex = torch.compile(flex.flex_attention, dynamic=False)
        fn = _compiled_flex
    score_mod = None
    if logit_softcap is not None:

        def score_mod(score, b, h, q_idx, k_idx):
            return torch.tanh(score / logit_softcap) * logit_softcap

    gqa = q.size(1) != k.size(1)
    if sinks is None:
        return fn(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=scale, enable_gqa=gqa)
    out, aux = fn(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=scale, enable_gqa=gqa,
                  return_aux=flex.AuxRequest(lse=True))
    keep = torch.sigmoid(aux.lse.float() - sinks.float()[None, :, None])  # (B, nh, T): the keys' share of the mass
    return (out.float() * keep[..., None]).to(q.dtype)


def single_query_attention(q, k, v, mask: Optional[torch.Tensor], scale: float, logit_softcap: Optional[float],
                           sinks: Optional[torch.Tensor] = None):
    """Attention of one new token (T = 1, KV-cache decoding) on the CPU, as two small matmuls.

    SDPA's CPU kernel always opens a parallel region; for a single query its fork/join costs more
    than the product itself, and stalls for a scheduler tick when the cores are busy. Query heads
    that share a key/value head are stacked as rows, so grouped-query attention needs no copy of k/v.
    In an eager step over a short cache (`ONE_THREAD_ATTENTION_MAX`) the two `bmm`s and the softmax run on one
    thread: each of them opens a parallel region otherwise, whose start costs more than their work (and waits
    for a scheduler tick when another job holds a core); their results are the same on any thread count.
    An eager 16-bit step without softcapping or sinks calls SDPA instead (in the same one-thread region).
    """
    B, nh, _, hs = q.shape
    nkv, L = k.size(1), k.size(2)
    # (is_eager_cpu first: nothing about threads is traced under torch.compile)
    eager = is_eager_cpu(q)
    one_thread = eager and k.numel() <= ONE_THREAD_ATTENTION_MAX and (threads := torch.get_num_threads()) > 1
    if one_thread:
        torch.set_num_threads(1)
    try:
        if eager and q.dtype != torch.float32 and logit_softcap is None and sinks is None:
            # 16-bit: SDPA's fused kernel (fp32 scores and sums inside, its output rounded once), where each 16-bit
            # bmm below is a oneDNN call that copies the strided keys first: the eager bf16 step 1.07-1.15x faster
            # at a 48-64-token cache, 1.39x at 600 (tutorials/inference_measurements.md#eager-s34). fp32 keeps the
            # bmms, as fast as SDPA there. (Compiled steps trace the ops below: their kernels are inductor's.)
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=nkv != nh)
        # Compiled, one query row per key head (no grouped queries): both products as elementwise products and
        # sums over the cache slice itself, which is what inductor lowers a one-row bmm to, but through views of the
        # slice that pin a compiled step's symbolic length (`litllm.compile_decode.attended_length`) to its value
        rowwise = not eager and nkv == nh
        if rowwise:
            scores = (q * k).sum(-1).view(B * nkv, 1, L).mul_(scale)  # (B, nh, 1, hs) x (B, nh, L, hs) -> (B*nh, 1, L)
        else:  # bmm on 3-D views (a cache slice's batch and head dims merge without a copy): matmul's 4-D
            # broadcasting costs a few more ops, which is what a one-token step spends its time on beside the weights
            q = q.reshape(B * nkv, nh // nkv, hs)  # (B*nkv, n_rep, hs): head h reads kv head h // n_rep
            if k.stride(-1) == 1 and (B == 1 or k.stride(0) == nkv * k.stride(1)):  # a cache slice: one view op
                keys_t = k.as_strided((B * nkv, hs, L), (k.stride(1), 1, k.stride(2)))  # (B*nkv, hs, L)
            else:
                keys_t = k.reshape(B * nkv, L, hs).transpose(1, 2)
            scores = torch.bmm(q, keys_t).mul_(eager_scalar(scale) if eager else scale)  # (B*nkv, n_rep, L)
        if sinks is not None or (mask is not None and mask.size(0) > 1):  # per-row masks, per-head sinks
            scores = scores.view(B, nkv, nh // nkv, L)
        if logit_softcap is not None:
            scores = softcap(scores, logit_softcap)
        if mask is not None:  # (B|1, 1, 1, L); None: the query is the newest token and sees every key
            lowest = torch.finfo(scores.dtype).min
            scores = torch.where(mask, scores, eager_scalar(lowest, scores.dtype) if eager else lowest)
        head_sinks = sinks.view(nkv, nh // nkv)[None] if sinks is not None else None  # (1, nkv, n_rep), as q's rows
        # (B, nkv, n_rep, L) fp32; (B*nkv, n_rep, L), or (1, B*nkv, n_rep, L) after a mask of one row, without a
        # view per layer where nothing needs the heads apart
        probs = softmax_with_sinks(scores, head_sinks)
        if probs.dtype != q.dtype:
            probs = probs.to(q.dtype)
        if probs.dim() != 3:
            probs = probs.view(B * nkv, nh // nkv, L)
        hs_v = v.size(-1)
        if rowwise:
            y = (probs.view(B, nh, L, 1) * v).sum(2)  # (B, nh, L, 1) x (B, nh, L, hs_v) -> (B, nh, hs_v)
        elif v.stride(-1) == 1 and (B == 1 or v.stride(0) == nkv * v.stride(1)):  # a cache slice: as the keys
            # (a reshape asks whether the slice is contiguous, which a compiled step's symbolic length cannot answer)
            values = v.as_strided((B * nkv, L, hs_v), (v.stride(1), v.stride(2), 1))  # (B*nkv, L, hs_v)
            y = torch.bmm(probs, values)  # (B*nkv, n_rep, hs_v)
        else:
            y = torch.bmm(probs, v.reshape(B * nkv, L, hs_v))
    finally:
        if one_thread:
            torch.set_num_threads(threads)
    return y.view(B, nh, 1, hs_v)


ONE_THREAD_ATTENTION_MAX = 1 << 17
"""Single-query attention runs on one thread in an eager CPU step while a row's cached keys of one layer are at most
this many values (a 134M Llama: 170 positions; 512 KB of fp32 keys, which one core reads in tens of microseconds);
longer caches read enough memory that a second core's bandwidth pays for the parallel region."""


def has_hooks(module: nn.Module) -> bool:
    """Whether forward hooks sit on `module` (FSDP, LoRA wrappers, adapters): a fused path that skips the module's call
    would skip them, so it keeps the call."""
    return bool(module._forward_hooks or module._forward_pre_hooks)


def is_eager_cpu(x: torch.Tensor) -> bool:
    """Whether ops on `x` run now on the CPU as they are called: a plain tensor outside torch.compile, not one that
    torch.export or torch.compile traces (those are fake or functional tensor subclasses)."""
    return type(x) is torch.Tensor and not torch.compiler.is_compiling() and x.is_cpu


_EAGER_SCALARS: dict[tuple[float, torch.dtype], torch.Tensor] = {}


def eager_scalar(value: float, dtype: torch.dtype = torch.float32) -> float | torch.Tensor:
    """`value` as a 0-dim CPU tensor of `dtype`, made once and only read, for the ops of an eager CPU step
    (`is_eager_cpu`: callers check; a tensor that torch.export or torch.compile traces takes the float, a constant of
    its graph). An op given a Python float wraps it in a tensor and casts it on every call (4 more aten ops under it),
    which the small ops of a one-token decode step notice; the values are the same (a 0-dim float32 tensor is read as
    the float rounded to float32, also by a bfloat16 op's float math). Nothing made under a tracing mode is kept, the
    float is returned then (a fake tensor cached while torch.export traced the step would fail later eager steps)."""
    scalar = _EAGER_SCALARS.get((value, dtype))
    if scalar is None:
        with torch.inference_mode(False), torch.no_grad():
            scalar = torch.tensor(value, dtype=dtype)
        if type(scalar) is not torch.Tensor:  # made under a tracing mode
            return value
        _EAGER_SCALARS[(value, dtype)] = scalar
    return scalar


def softcap(x: torch.Tensor, cap: float) -> torch.Tensor:
    return torch.tanh(x / cap) * cap


# ---------------------------------------------------------------------- MLPs
ACTIVATIONS = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
}


class GatedMLP(nn.Module):
    """SwiGLU / GeGLU: proj(act(gate(x)) * up(x)), with gate and up fused into `fc`."""

    def __init__(self, config: Config, intermediate_size: Optional[int] = None) -> None:
        super().__init__()
        self.intermediate_size = intermediate_size or config.intermediate_size
        self.fc = nn.Linear(config.n_embd, 2 * self.intermediate_size, bias=config.mlp_bias)  # rows [gate | up]
        self.proj = nn.Linear(self.intermediate_size, config.n_embd, bias=config.mlp_bias)
        self.act = ACTIVATIONS[config.activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.fc(x).chunk(2, dim=-1)
        return self.proj(self.act(gate) * up)


class GeluMLP(nn.Module):
    def __init__(self, config: Config) -> None:
        super().__init__()
        self.fc = nn.Linear(config.n_embd, config.intermediate_size, bias=config.mlp_bias)
        self.proj = nn.Linear(config.intermediate_size, config.n_embd, bias=config.mlp_bias)
        self.act = ACTIVATIONS[config.activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.act(self.fc(x)))


class MoE(nn.Module):
    """Mixture of gated-MLP experts; each token goes to its top-k experts (Mixtral, Qwen3-MoE, OLMoE), plus
    `n_shared_expert` shared experts every token goes through (one GatedMLP of that many experts' size, added to
    the routed sum: DeepSeek, GLM-4.5, Llama 4). Subclasses change the routing (`route`), the experts
    (`make_experts`) or where the routing weight applies (`scale_inputs`); the dispatch below serves them all.

    Ways to run the experts, with equal results (each token's experts summed in expert index order):
    - sparse (many tokens: training, prefill, also under torch.compile; eager on the CPU, decode steps too):
      tokens sorted by expert, each expert runs once on its contiguous block of routed tokens, `index_add_` back
      into place -- k / n_expert of the dense FLOPs and expert-weight reads. The block sizes are read back from
      the device once per layer (one host sync, not one per expert); under torch.compile this dispatch runs
      eagerly (one graph break per MoE layer, the rest compiled). CPU fp32 training of plain SiLU experts runs this
      path as one autograd Function with one C++ op each way (`litllm.fused_experts`; `_fused_experts_apply`).
    - dense (decode-sized inputs, at most n_expert tokens, when compiled or off the CPU): every expert on every
      token, weighted 0 where not chosen. No shape depends on the routing: no host sync, static shapes for
      torch.compile and CUDA graphs, FakeTensorMode (`litllm estimate` of decoding). It reads every expert's
      weights, n_expert / k times what sparse reads: eager on the CPU, where reading the block sizes back waits
      for no device, decode steps go sparse (2.4x the tokens/s in `benchmarks/moe.py`).
    - one token (eager on the CPU: decoding at batch 1): the sparse path's sum without its sorting and scattering,
      each chosen expert called directly on the token.
    - balanced (fake tensors, more tokens: `litllm estimate` of training/prefill): the sparse path's shapes
      for perfectly balanced routing, so the estimate holds the activations sparse dispatch holds.
    The choice is made on the shape, the device and the tracing mode, never on data.
    """

    scale_inputs = False
    """Weight each expert's input by its routing weight instead of its output (Llama 4)."""
    eager_sparse_experts = None
    """`sparse_experts` that torch.compile leaves out of its graphs (set on first use: it imports torch._dynamo)."""

    def __init__(self, config: Config) -> None:
        super().__init__()
        self.config = config
        self.router = nn.Linear(config.n_embd, config.n_expert, bias=config.router_bias)
        self.experts = self.make_experts(config)
        size = config.expert_intermediate_size * config.n_shared_expert
        self.shared_experts = GatedMLP(config, size) if config.n_shared_expert else None
        # the load-balancing loss's terms of the last forward, kept while training with one (GPT.forward reads them)
        self.router_stats: Optional[tuple[torch.Tensor, torch.Tensor, int]] = None
        if MoE.eager_sparse_experts is None:  # made before any tracing: creating it inside a graph would break it
            MoE.eager_sparse_experts = torch.compiler.disable(MoE.sparse_experts)

    def make_experts(self, config: Config) -> nn.Module:
        """The experts, iterable as one callable per expert (index order): `MoE`'s dispatch paths run them."""
        return nn.ModuleList(GatedMLP(config, config.expert_intermediate_size) for _ in range(config.n_expert))

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x: (N, C) -> router logits (N, n_expert) (the load-balancing loss reads them), each token's expert
        weights (N, k) fp32 and chosen experts (N, k)."""
        router_logits = self.router(x)
        probs = torch.softmax(router_logits, dim=-1, dtype=torch.float32)  # (N, n_expert)
        weights, chosen = probs.topk(self.config.n_expert_per_token, dim=-1)  # (N, k)
        if self.config.moe_normalize_topk:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return router_logits, weights, chosen

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        x = x.reshape(-1, C)  # (B*T, C)
        keep_stats = self.training and self.config.router_aux_loss_coef
        routing = self._fused_routing(x)
        if routing is not None:  # the routing, the experts' sort and the loss's terms from one C++ op
            weights, chosen, sort = routing.weights, routing.chosen, (routing.order, routing.counts, routing.pos)
            if keep_stats:
                self.router_stats = routing.stats
        else:
            router_logits, weights, chosen = self.route(x)
            sort = None
            if keep_stats:
                self.router_stats = router_stats(router_logits, self.config.n_expert_per_token)
        fake = not torch.compiler.is_compiling() and is_fake(x)  # (is_fake can't be traced: test it outside only)
        if fake and x.size(0) > self.config.n_expert:
            y = self.balanced_experts(x, weights.to(x.dtype))
        elif fake or self.use_dense(x):
            y = self.dense_experts(x, weights, chosen)
        elif torch.compiler.is_compiling():  # data-dependent block sizes: eager between compiled graphs
            y = MoE.eager_sparse_experts(self, x, weights.to(x.dtype), chosen)
        elif x.size(0) == 1:  # a decode step at batch 1
            y = self.token_experts(x, weights.to(x.dtype), chosen)
        else:
            y = self.sparse_experts(x, weights.to(x.dtype), chosen, sort)
        if self.shared_experts is not None:
            y = y + self.shared_experts(x)
        return y.view(B, T, C)

    def _fused_routing(self, x: torch.Tensor) -> Optional[fused_routing.Routing]:
        """`MoE.route`'s softmax top-k routing, with the sort `sparse_experts` makes and the load-balancing loss's
        terms, as `litllm.fused_routing.softmax_topk` (one C++ op each way) in eager CPU fp32 training; None where it
        does not apply: another router (a subclass's `route`), eval mode, other dtypes or devices, torch.compile.
        x: (N, C)."""
        if type(self).route is not MoE.route or not self.training or not fused_routing.applies(x):
            return None
        router_logits = self.router(x)  # (N, n_expert)
        if not fused_routing.applies(router_logits):  # (a router of another dtype)
            return None
        return fused_routing.softmax_topk(router_logits, self.config.n_expert_per_token,
                                          self.config.moe_normalize_topk)

    def run_expert(self, expert: nn.Module, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """One expert on its tokens x (n, C) with their routing weights (n, 1)."""
        return expert(x * weights) if self.scale_inputs else expert(x) * weights

    def balanced_experts(self, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Fake tensors (`litllm estimate` of training/prefill): the sparse path's shapes under perfectly balanced
        routing, each expert on N * k / n_expert tokens, so the estimate counts the activations sparse dispatch
        keeps, not every expert's on every token. Fake tensors hold no routing to follow. Where the fused experts'
        path would take the real step (a CPU run's fake step, `litllm.cpu_ops.fake_cpu_training`), that path, with
        the N * k routed rows spread over the experts as evenly as they go."""
        if self._fused_experts_apply(x):
            k, E = self.config.n_expert_per_token, self.config.n_expert
            counts = [x.size(0) * k // E + (e < x.size(0) * k % E) for e in range(E)]
            order = torch.arange(x.size(0) * k, device=x.device)  # (N*k,) any order: fake tensors hold no values
            return fused_sparse_experts(self.experts, x, weights, order, counts)
        n = math.ceil(x.size(0) * self.config.n_expert_per_token / self.config.n_expert)
        rows = torch.arange(n, device=x.device)
        y = torch.zeros_like(x)
        for slot, expert in enumerate(self.experts):
            y.index_add_(0, rows, self.run_expert(expert, x[:n], weights[:n, slot % weights.size(1), None]))
        return y

    def use_dense(self, x: torch.Tensor) -> bool:
        """x: (N, C). Dense for at most n_expert tokens (decoding) when compiled or off the CPU. Eager on the CPU,
        reading the block sizes back waits for no device, and the sparse path reads only the chosen experts'
        weights, k / n_expert of what dense reads (a decode step is bound by reading weights)."""
        return x.size(0) <= self.config.n_expert and (x.device.type != "cpu" or torch.compiler.is_compiling())

    def sparse_experts(self, x: torch.Tensor, weights: torch.Tensor, chosen: torch.Tensor,
                       sort: Optional[tuple[torch.Tensor, list[int], torch.Tensor]] = None) -> torch.Tensor:
        """x (N, C), weights/chosen (N, k): each expert once, on the tokens routed to it, sorted into blocks. sort:
        (order, counts) as made below and each slot's place in that order, where the fused routing made them."""
        if sort is None:
            flat = chosen.reshape(-1)  # (N*k,) expert of each (token, slot)
            order = torch.argsort(flat, stable=True)  # slots grouped by expert, tokens in order within a group
            counts = torch.bincount(flat, minlength=self.config.n_expert).tolist()  # the one host sync
            pos = None
        else:
            order, counts, pos = sort
        if self._fused_experts_apply(x):
            return fused_sparse_experts(self.experts, x, weights, order, counts, pos)
        token = order // chosen.size(1)  # (N*k,) token of each sorted slot
        xs, ws = x.index_select(0, token).split(counts), weights.reshape(-1)[order, None].split(counts)
        out = [self.run_expert(expert, xs[e], ws[e]) for e, expert in enumerate(self.experts) if counts[e]]
        return torch.zeros_like(x).index_add_(0, token, torch.cat(out))

    def _fused_experts_apply(self, x: torch.Tensor) -> bool:
        """Whether `sparse_experts` takes `litllm.fused_experts.fused_sparse_experts` (the experts' path as one
        autograd Function, forward and backward each one C++ op over every expert's rows): fp32 CPU training
        (train mode with gradients to make, so an eval forward stays the module path's bit for bit; not under
        torch.compile or autocast) of SiLU `GatedMLP` experts whose Linears are plain
        bias-free fp32 ones with no hooks (LoRA, FSDP, quantized experts keep the module calls), the routing weight
        on the output (not Llama 4's), where litllm's op library runs (AVX-512). x: (N, C)."""
        if not (self.training and eager_fp32_training(x) and not self.scale_inputs
                and type(self.experts) is nn.ModuleList):
            return False

        def plain(linear: nn.Module) -> bool:
            return (type(linear) is nn.Linear and linear.bias is None and not has_hooks(linear)
                    and plain_tensor(linear.weight.data) and linear.weight.dtype == torch.float32)

        return all(type(e) is GatedMLP and e.act is F.silu and not has_hooks(e) and plain(e.fc) and plain(e.proj)
                   for e in self.experts) and fused_experts_available()

    def token_experts(self, x: torch.Tensor, weights: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
        """One token, x (1, C), weights/chosen (1, k): the sparse path's sum, bit for bit (its k experts in expert
        index order), without the sorting, gathering, splitting and scattering that make a decode step's MoE layer
        1.4-1.6x slower in `benchmarks/moe.py`'s model. One host sync: the chosen experts' ids."""
        y = None
        for e, slot in sorted(zip(chosen[0].tolist(), range(chosen.size(1)))):
            out = self.run_expert(self.experts[e], x, weights[:, slot, None])
            y = out if y is None else y + out
        return y

    def dense_experts(self, x: torch.Tensor, weights: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
        # (N, n_expert): each token's weight for every expert, 0 for the ones it did not choose
        dense = weights.new_zeros(x.size(0), self.config.n_expert).scatter_(1, chosen, weights).to(x.dtype)
        y = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            y = y + self.run_expert(expert, x, dense[:, e, None])  # unchosen experts add exactly 0
        return y


class Llama4MoE(MoE):
    """Llama 4's MoE: the top-k router logits through a sigmoid weight each chosen expert's *input* (not its
    output); its shared expert is `n_shared_expert` 1."""

    scale_inputs = True

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        router_logits = self.router(x)
        top, chosen = router_logits.topk(self.config.n_expert_per_token, dim=-1)  # (N, k)
        return router_logits, torch.sigmoid(top.float()), chosen


class StackedLinear(nn.Module):
    """One Linear per expert in one tensor: weight (n, in, out), applied as x @ weight[e] + bias[e]."""

    def __init__(self, n: int, in_features: int, out_features: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n, in_features, out_features))
        self.bias = nn.Parameter(torch.empty(n, out_features))
        self.reset_parameters()

    def forward(self, e: int, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight[e] + self.bias[e]

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, std=math.sqrt(2.0 / (5 * self.weight.size(1))))
        nn.init.zeros_(self.bias)


class ClampedSwiGLUExperts(nn.Module):
    """gpt-oss's experts, stacked: `gate_up` (E, C, 2I), whose output columns alternate gate, up, and `down`
    (E, I, C), both with biases. Expert e: gate clamped to <= limit, up to [-limit, limit], then
    down((up + 1) * gate * sigmoid(alpha * gate)). Iterating yields one callable per expert, so `MoE`'s
    dispatch paths run these as they run a list of GatedMLPs."""

    def __init__(self, config: Config) -> None:
        super().__init__()
        E, C, self.intermediate_size = config.n_expert, config.n_embd, config.expert_intermediate_size
        self.gate_up = StackedLinear(E, C, 2 * self.intermediate_size)
        self.down = StackedLinear(E, self.intermediate_size, C)
        self.limit, self.alpha = config.swiglu_limit, config.swiglu_alpha

    def run(self, e: int, x: torch.Tensor) -> torch.Tensor:
        h = self.gate_up(e, x)  # (N, 2I)
        gate, up = h[..., ::2].clamp(max=self.limit), h[..., 1::2].clamp(-self.limit, self.limit)
        return self.down(e, (up + 1) * (gate * torch.sigmoid(gate * self.alpha)))

    def __len__(self) -> int:
        return self.gate_up.weight.size(0)

    def __getitem__(self, e: int):
        return partial(self.run, e)

    def __iter__(self):
        return (self[e] for e in range(len(self)))


class ClampedSwiGLUMoE(MoE):
    """gpt-oss's MoE: a router with a bias picks each token's top-k experts, weighted by the softmax over their
    logits (= the renormalised top-k probabilities, `moe_normalize_topk`), run as `ClampedSwiGLUExperts`."""

    def make_experts(self, config: Config) -> nn.Module:
        return ClampedSwiGLUExperts(config)


class GroupedRouter(nn.Linear):
    """DeepSeek-V2/V3's and GLM-4.5's router: softmax or sigmoid scores; experts chosen within the
    `n_topk_groups` best of `n_expert_groups` groups, by the scores plus a fixed per-expert correction bias
    (sigmoid scoring; the bias decides who is chosen, never their weights); the chosen experts' scores,
    renormalised if `moe_normalize_topk`, times `routed_scaling_factor`. Scores are computed in fp32.

    `e_score_correction_bias` is a buffer, not a parameter: it gets no gradient and finetuning leaves it as
    the checkpoint has it (DeepSeek-V3 adjusts it between steps of pretraining, outside backprop)."""

    def __init__(self, config: Config) -> None:
        super().__init__(config.n_embd, config.n_expert, bias=False)
        self.config = config
        if config.moe_correction_bias:
            self.register_buffer("e_score_correction_bias", torch.zeros(config.n_expert, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x: (N, C) -> as `MoE.route`."""
        c = self.config
        logits = F.linear(x.float(), self.weight.float())  # (N, n_expert)
        scores = logits.sigmoid() if c.moe_scoring == "sigmoid" else logits.softmax(dim=-1)
        choice = scores + self.e_score_correction_bias.float() if c.moe_correction_bias else scores
        if c.n_expert_groups > 1:
            grouped = choice.view(-1, c.n_expert_groups, c.n_expert // c.n_expert_groups)  # (N, G, E/G)
            group_score = grouped.topk(2, dim=-1).values.sum(-1) if c.moe_scoring == "sigmoid" else grouped.amax(-1)
            best = group_score.topk(c.n_topk_groups, dim=-1).indices  # (N, n_topk_groups)
            keep = torch.zeros_like(group_score, dtype=torch.bool).scatter_(1, best, True)  # (N, G)
            choice = grouped.masked_fill(~keep[..., None], float("-inf")).flatten(1)
        chosen = choice.topk(c.n_expert_per_token, dim=-1).indices  # (N, k)
        weights = scores.gather(1, chosen)
        if c.moe_normalize_topk:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return logits, weights * c.routed_scaling_factor, chosen


class GroupedMoE(MoE):
    """MoE with `GroupedRouter` routing (and shared experts, as `MoE` runs them): DeepSeek-V2/V3, GLM-4.5."""

    def __init__(self, config: Config) -> None:
        super().__init__(config)
        self.router = GroupedRouter(config)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.router(x)


def uses_grouped_router(config: Config) -> bool:
    return (config.moe_scoring != "softmax" or config.moe_correction_bias or config.n_expert_groups > 1
            or config.routed_scaling_factor != 1.0 or config.n_shared_expert > 0)


def build_mlp(config: Config, layer_idx: int) -> nn.Module:
    if config.is_moe_model and not config.is_moe(layer_idx):
        return GatedMLP(config)  # a dense layer of an MoE model (Qwen3-MoE mlp_only_layers, Llama 4 moe_layers)
    if config.mlp_class_name == "MoE" and config.swiglu_limit is not None:
        return ClampedSwiGLUMoE(config)
    if config.mlp_class_name == "MoE" and uses_grouped_router(config):
        return GroupedMoE(config)
    return {"GatedMLP": GatedMLP, "GeluMLP": GeluMLP, "MoE": MoE, "Llama4MoE": Llama4MoE}[config.mlp_class_name](config)


def router_stats(router_logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """One MoE layer's terms of `load_balancing_loss` from its router logits (N, n_expert), as transformers'
    `load_balancing_loss_func` computes them (whatever the layer's own routing): (top-k assignments to each expert
    (n_expert,), each expert's router probability summed over the tokens (n_expert,), N). No host sync (counts by
    one-hot sums)."""
    n_expert = router_logits.size(-1)
    probs = torch.softmax(router_logits.float(), dim=-1)  # (N, n_expert)
    chosen = probs.topk(k, dim=-1).indices  # (N, k)
    return F.one_hot(chosen, n_expert).sum(dim=(0, 1)).float(), probs.sum(dim=0), router_logits.size(0)


def load_balancing_loss(stats: list[tuple[torch.Tensor, torch.Tensor, int]], n_expert: int) -> torch.Tensor:
    """Switch Transformer's auxiliary loss over the MoE layers' `router_stats` (or the fused routing's), as
    transformers' `load_balancing_loss_func` computes it without an attention mask: n_expert x
    sum_e (share of top-k assignments to e) x (mean router probability of e), both averaged over every
    layer's tokens."""
    assigned = sum(s[0] for s in stats)  # (n_expert,)
    prob_sum = sum(s[1] for s in stats)  # (n_expert,)
    rows = sum(s[2] for s in stats)
    return n_expert * torch.sum((assigned / rows) * (prob_sum / rows))


# ---------------------------------------------------------------------- norms
class RMSNorm(nn.Module):
    """Root-mean-square norm computed in fp32; `unit_offset` scales by (1 + weight) as Gemma does."""

    def __init__(self, size: int, eps: float = 1e-6, unit_offset: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(size))
        self.eps = eps
        self.unit_offset = unit_offset
        self.reset_parameters()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight  # (once: each module attribute read goes through nn.Module.__getattr__)
        if x.dtype == torch.float32 and weight.dtype == torch.float32 and not self.unit_offset:
            if not torch.compiler.is_compiling() and x.is_cpu:
                if torch.is_grad_enabled() and plain_tensor(weight.data):
                    return fused_norms.training_rms_norm(x, weight, self.eps)  # training, eager
                if not torch.is_grad_enabled():
                    # what F.rms_norm computes (bit for bit) in fewer kernels: its CPU composite runs ~15 ops, and in a
                    # one-token decode step each op after a weight-streaming matmul runs with cold caches
                    return torch.mul(x, inverse_rms(x, self.eps)).mul_(weight)
            return F.rms_norm(x, weight.shape, weight, self.eps)  # one fused kernel on GPUs and compiled
        if self._bf16_op_applies(x, weight):
            return torch.ops.litllm_cpu.bf16_rms_norm(x, None, weight, self.eps)[0]  # (one op where ~9 are otherwise)
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        weight = (1 + self.weight.float()) if self.unit_offset else self.weight.float()
        return (x * weight).to(dtype)

    def residual_forward(self, x: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x + h, this norm of it): a block's residual add and the next norm, one kernel each way in training where
        `fused_norms` applies."""
        if not self.unit_offset and not has_hooks(self) and fused_norms.applies(x, self.weight) \
                and plain_tensor(h) and h.dtype == torch.float32 and x.shape == h.shape:
            return fused_norms.add_rms_norm(x, h, self.weight, self.eps)
        if h.dtype == x.dtype and not has_hooks(self) and self._bf16_op_applies(x, self.weight):
            y, x = torch.ops.litllm_cpu.bf16_rms_norm(x, h, self.weight, self.eps)
            return x, y
        x = x + h
        return x, self(x)

    def _bf16_op_applies(self, x: torch.Tensor, weight: torch.Tensor) -> bool:
        """Does litllm's `bf16_rms_norm` op compute this norm: bf16 CPU inference (no autograd, outside torch.compile),
        no `unit_offset`, the op library there (`litllm.cpu_ops.bf16_norm_op`)? The eager bf16 decode step's norms."""
        return (x.dtype == torch.bfloat16 and weight.dtype == torch.bfloat16 and not self.unit_offset and x.is_cpu
                and type(x) is torch.Tensor and not torch.is_grad_enabled() and not torch.compiler.is_compiling()
                and bf16_norm_op() is not None)

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.weight) if self.unit_offset else nn.init.ones_(self.weight)


def inverse_rms(x: torch.Tensor, eps: float) -> torch.Tensor:
    """1 / sqrt(mean(x^2) + eps) over the last dim of fp32 x, (..., 1), as F.rms_norm's CPU composite computes it.
    CPU `mean` is `sum` then `div_` by the count: eager, that division and the `+ eps` are one `addcdiv` of 0-dim
    tensors (eps + 1 * (sum / n): the same rounding, also where FMA fuses it), in place of two ops on Python floats.
    x: on the CPU, outside torch.compile."""
    if type(x) is torch.Tensor:  # (not a tensor torch.export traces: see `eager_scalar`)
        return eager_scalar(eps).addcdiv(x.square().sum(-1, keepdim=True), eager_scalar(float(x.size(-1)))).rsqrt_()
    return x.square().mean(-1, keepdim=True).add_(eps).rsqrt_()


def build_norm(config: Config, size: int) -> nn.Module:
    if config.norm_class_name == "RMSNorm":
        return RMSNorm(size, eps=config.norm_eps, unit_offset=config.norm_unit_offset)
    return nn.LayerNorm(size, eps=config.norm_eps, bias=config.norm_bias)


# ---------------------------------------------------------------------- RoPE
def rope_inv_freq(n_elem: int, base: float, scaling: Optional[dict]) -> tuple[torch.Tensor, float]:
    """Inverse frequencies (n_elem/2,) and the cos/sin scale, following the HF rope_type definitions."""
    inv_freq = 1.0 / (base ** (torch.arange(0, n_elem, 2, dtype=torch.int64).float() / n_elem))
    if not scaling:
        return inv_freq, 1.0
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return inv_freq, 1.0
    if kind == "linear":
        return inv_freq / scaling["factor"], 1.0
    if kind == "llama3":
        factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        is_medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        return torch.where(is_medium, smoothed, scaled), 1.0
    if kind == "yarn":
        factor = scaling["factor"]
        old_len = scaling["original_max_position_embeddings"]

        def mscale(s: float, m: float = 1.0) -> float:
            return 1.0 if s <= 1 else 0.1 * m * math.log(s) + 1.0

        attn_factor = scaling.get("attention_factor")
        if attn_factor is None:
            m, m_all = scaling.get("mscale"), scaling.get("mscale_all_dim")
            attn_factor = mscale(factor, m) / mscale(factor, m_all) if (m and m_all) else mscale(factor)
        beta_fast, beta_slow = scaling.get("beta_fast") or 32, scaling.get("beta_slow") or 1

        def correction_dim(rotations: float) -> float:
            return n_elem * math.log(old_len / (rotations * 2 * math.pi)) / (2 * math.log(base))

        lo, hi = correction_dim(beta_fast), correction_dim(beta_slow)
        if scaling.get("truncate", True):
            lo, hi = math.floor(lo), math.ceil(hi)
        lo, hi = max(lo, 0), min(hi, n_elem - 1)
        if lo == hi:
            hi += 0.001
        ramp = ((torch.arange(n_elem // 2, dtype=torch.float32) - lo) / (hi - lo)).clamp(0, 1)
        extrapolation = 1 - ramp
        inv_freq = (inv_freq / factor) * (1 - extrapolation) + inv_freq * extrapolation
        return inv_freq, float(attn_factor)
    if kind == "longrope":
        old_len = scaling["original_max_position_embeddings"]
        factor = scaling.get("factor") or scaling.get("max_position_embeddings", old_len) / old_len
        attn_factor = scaling.get("attention_factor")
        if attn_factor is None:
            attn_factor = 1.0 if factor <= 1 else math.sqrt(1 + math.log(factor) / math.log(old_len))
        return inv_freq / torch.tensor(scaling["long_factor"], dtype=torch.float32), float(attn_factor)
    raise ValueError(f"unsupported rope_type {kind!r} (expected linear, llama3, yarn or longrope)")


def rope_cache(
    seq_len: int, n_elem: int, base: float, scaling: Optional[dict], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape (seq_len, n_elem), fp32, laid out as [freqs | freqs] for rotate-half RoPE; sin's first half
    negated (see `apply_rope`)."""
    if n_elem == 0 or torch.device(device).type == "meta":  # (meta: placeholders, see `GPT.build_rope_cache`)
        return torch.empty(seq_len, n_elem, device=device), torch.empty(seq_len, n_elem, device=device)
    inv_freq, attn_factor = rope_inv_freq(n_elem, base, scaling)
    positions = torch.arange(seq_len, dtype=torch.float32)
    freqs = torch.outer(positions, inv_freq)  # (seq_len, n_elem/2)
    emb = torch.cat((freqs, freqs), dim=-1)
    sin = emb.sin() * attn_factor
    sin[:, : n_elem // 2].neg_()
    return (emb.cos() * attn_factor).to(device), sin.to(device)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first n_elem dims of x (B, nh, T, hs); cos/sin are (T, n_elem), (B, T, n_elem) or (B, 1, T, n_elem),
    sin with its first half negated (`rope_cache`): x * cos + [-x2 | x1] * [s | s] = x * cos + [x2 | x1] * [-s | s],
    the same values with a roll in place of a slice, a negation and a cat."""
    n = cos.size(-1)
    if cos.dim() == 3:
        cos, sin = cos[:, None], sin[:, None]  # (B, 1, T, n)
    part = n < x.size(-1)
    x_rope = x[..., :n] if part else x  # (each op counts in a one-token decode step: no slices when n = hs)
    if cos.dtype != x.dtype:
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    out = x_rope * cos + x_rope.roll(n // 2, dims=-1) * sin
    return torch.cat((out, x[..., n:]), dim=-1) if part else out


def apply_rope_qk(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`apply_rope` to q (B, nh, T, hs) and k (B, nkv, T, hs). For one token (decoding) as one tensor: the same
    values in half the ops, which is what a decode step's time goes to beside its matmuls."""
    if q.size(2) != 1 or q.dtype != k.dtype:
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    qk = apply_rope(torch.cat((q, k), dim=1), cos, sin)  # (B, nh + nkv, 1, hs)
    return qk[:, : q.size(1)], qk[:, q.size(1):]


# ---------------------------------------------------------------------- KV cache
class KVCache(nn.Module):
    """Preallocated keys and values (B, nkv, max_seq_length, hs); each row is written at its own positions."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("k", k, persistent=False)
        self.register_buffer("v", v, persistent=False)

    @classmethod
    def allocate(cls, batch_size, n_kv, max_seq_length, head_size, device, dtype) -> "KVCache":
        shape = (batch_size, n_kv, max_seq_length, head_size)
        return cls(torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype))

    def rows(self, start: int, stop: int) -> "KVCache":
        """A cache over rows start..stop-1 of this one (views: writes land here), e.g. to prefill one slot."""
        return KVCache(self.k[start:stop], self.v[start:stop])

    def update(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_len: Optional[int] = None):
        """Write k/v (B, nkv, T, hs) at positions input_pos ((T,) for every row, or (B, T) per row);
        return the keys/values of the first `kv_len` positions (default: all), (B, nkv, L, hs)."""
        B = k.size(0)
        if input_pos.dim() == 2 and B == 1:
            input_pos = input_pos[0]  # one row: index_copy_ is a little faster than scatter_
        # (in a one-token decode step every op counts: no slices that select everything; the buffers read once, as
        # each read of a module's buffer goes through nn.Module.__getattr__)
        all_k, all_v = self.k, self.v
        cache_k, cache_v = (all_k, all_v) if B == all_k.size(0) else (all_k[:B], all_v[:B])
        if input_pos.dim() == 1:
            cache_k.index_copy_(2, input_pos, k if k.dtype == all_k.dtype else k.to(all_k.dtype))
            cache_v.index_copy_(2, input_pos, v if v.dtype == all_v.dtype else v.to(all_v.dtype))
        else:
            # per-row positions: index_put_ on (B, L, nkv, hs) views at (row, position) pairs, not scatter_ along dim 2:
            # inductor writes an index_put_ in place, but a scatter_ into a clone of the layer's whole cache, copied
            # back after (each layer's K and V copied twice a step: a 4-row int8wo step at 256 positions 1.75x the CPU;
            # tutorials/inference_measurements.md#batchstep-s34)
            rows = torch.arange(B, device=input_pos.device)[:, None]  # (B, 1), against input_pos (B, T)
            cache_k.transpose(1, 2).index_put_((rows, input_pos), k.transpose(1, 2).to(all_k.dtype))  # (B, T, nkv, hs)
            cache_v.transpose(1, 2).index_put_((rows, input_pos), v.transpose(1, 2).to(all_v.dtype))
        # (a compiled step's `kv_len` is symbolic, at most the cache's length: sliced, no guard on its value)
        if kv_len is None or (isinstance(kv_len, int) and kv_len >= all_k.size(2)):
            return cache_k, cache_v
        return cache_k[:, :, :kv_len], cache_v[:, :, :kv_len]
