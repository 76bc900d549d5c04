"""`litllm convert_to_gguf` against oracles no one here wrote: the `gguf` reader, transformers' GGUF loader
and (where `llama_cpp` imports) llama.cpp itself."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

import llama_cpp_check
from conftest import SAMPLE_TEXT, make_converted_checkpoint, write_lora_folder
from llama_cpp_check import STRINGS, litllm_greedy, llama_cpp_detokenize, llama_cpp_greedy

gguf = pytest.importorskip("gguf", reason="the gguf extra is not installed (pip install 'litllm[gguf]')")

from litllm.errors import LitLLMError  # noqa: E402
from litllm.gguf_export import convert_to_gguf  # noqa: E402

# tiny variants where transformers' GGUF loader reads back every hyper-parameter the family uses
# (it ignores attention.key_length for qwen3 (128 assumed), query_pre_attn_scalar for gemma2, rope.scaling for llama,
# expert_feed_forward_length for qwen3_moe (768 assumed))
VARIANTS = {
    "llama-tied-mqa": ("llama-linear-mqa", dict(rope_scaling=None)),
    "qwen3-gguf": ("qwen3", dict(head_dim=128)),  # Qwen3Config's default head_dim
    "gemma2-gguf": ("gemma2", dict(query_pre_attn_scalar=16)),
    # Gemma-2-27B's layout: scores scaled by n_embd / n_head, not head_dim; llama.cpp knows it by its 46 layers
    "gemma2-27b-layout": ("gemma2", dict(num_hidden_layers=46, head_dim=8, query_pre_attn_scalar=16)),
    # llama.cpp's qwen3moe graph runs every layer as MoE (the tiny config has a dense layer 1)
    "qwen3_moe-gguf": ("qwen3_moe", dict(num_hidden_layers=2, mlp_only_layers=[], head_dim=128,
                                         moe_intermediate_size=768)),
    # llama.cpp's olmoe graph norms K over n_embd rows: OLMoE-1B-7B's layout, as many KV heads as heads
    "olmoe-gguf": ("olmoe", dict(num_key_value_heads=4)),
    # llama.cpp's gpt-oss graph: the SwiGLU limit of the released models (7) and YaRN truncated
    "gpt_oss-gguf": ("gpt_oss", dict(swiglu_limit=7.0, rope_parameters=dict(
        rope_type="yarn", rope_theta=150000.0, factor=4.0, original_max_position_embeddings=16, beta_fast=32.0,
        beta_slow=1.0, truncate=True))),
    # llama.cpp's llama4 graph: the released models' chunk (8192) and NoPE temperature tuning (floor 8192, scale 0.1)
    "llama4-gguf": ("llama4", dict(attention_chunk_size=8192, floor_scale=8192, attn_scale=0.1)),
    # Ministral 3 with YaRN's betas and attention factor away from their defaults (llama.cpp's mistral3 graph reads them)
    "ministral3-yarn": ("ministral3", dict(rope_parameters=dict(
        rope_type="yarn", rope_theta=1000000.0, factor=4.0, original_max_position_embeddings=16, beta_fast=16.0,
        beta_slow=2.0, mscale=1.0, mscale_all_dim=0.5, llama_4_scaling_beta=0.5))),
    # DeepSeek-V2-Lite's routing: no expert groups (llama.cpp scores a group by its two best experts, V2 by its best)
    "deepseek_v2-gguf": ("deepseek_v2", dict(topk_method="greedy", n_group=1, topk_group=1)),
}
# weights multiplied (litllm's and HF's, by name suffix) so that random ones reach what the family clamps (gpt-oss's
# SwiGLU at 7)
SCALED = {"gpt_oss-gguf": (20.0, ("mlp.experts.gate_up.weight", "mlp.experts.gate_up_proj"))}


def checkpoint(folder: Path, family: str, byte_fallback: bool = False, pad_token: str | None = None) -> Path:
    """A converted tiny model of `family` (or of a VARIANTS entry) with a trained tokenizer."""
    from hf_models import FAMILIES

    base, overrides = VARIANTS.get(family, (family, {}))
    if base != family:
        config_cls, model_cls, kwargs = FAMILIES[base]
        FAMILIES[family] = (config_cls, model_cls, dict(kwargs, **overrides))
    try:
        make_converted_checkpoint(folder, family, byte_fallback=byte_fallback)
    finally:
        if base != family:
            del FAMILIES[family]
    if family in SCALED:
        from safetensors.torch import save_file

        from litllm.model_folder import read_safetensors

        factor, suffixes = SCALED[family]
        for file in ("lit_model.safetensors", "model.safetensors"):
            weights = read_safetensors(folder / file)
            save_file({k: v * factor if k.endswith(suffixes) else v for k, v in weights.items()}, folder / file,
                      metadata={"format": "pt"})
    if pad_token:  # Phi-3's transformers config defaults pad_token_id to 32000, beyond a tiny vocabulary
        config = json.loads((folder / "tokenizer_config.json").read_text())
        (folder / "tokenizer_config.json").write_text(json.dumps(dict(config, pad_token=pad_token)))
    return folder


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> Path:
    return checkpoint(tmp_path_factory.mktemp("gguf_llama"), "llama")


@pytest.fixture(scope="module")
def llama_spm(tmp_path_factory) -> Path:
    """Llama 2's layout: a SentencePiece-style BPE with byte fallback."""
    return checkpoint(tmp_path_factory.mktemp("gguf_llama_spm"), "llama", byte_fallback=True)


@pytest.fixture(scope="module")
def gemma_spm(tmp_path_factory, llama_spm) -> Path:
    """Gemma's layout: SentencePiece-style, no '▁' prepended, a (no-op) split on spaces, no decoder strip."""
    folder = tmp_path_factory.mktemp("gguf_gemma_spm") / "model"
    shutil.copytree(llama_spm, folder, ignore=shutil.ignore_patterns("*.gguf"))
    raw = json.loads((folder / "tokenizer.json").read_text())
    raw["normalizer"] = {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}
    raw["pre_tokenizer"] = {"type": "Split", "pattern": {"String": " "}, "behavior": "MergedWithPrevious",
                            "invert": False}
    raw["decoder"]["decoders"] = [d for d in raw["decoder"]["decoders"] if d["type"] != "Strip"]
    (folder / "tokenizer.json").write_text(json.dumps(raw, ensure_ascii=False))
    return folder


def with_split_regex(source: Path, folder: Path, regex: str | tuple[str, ...]) -> Path:
    """`source` with Llama 3's / Qwen 2's pre-tokenizer layout: Split regex(es) (DeepSeek-V3: three), then ByteLevel
    without its own."""
    shutil.copytree(source, folder, ignore=shutil.ignore_patterns("*.gguf"))
    raw = json.loads((folder / "tokenizer.json").read_text())
    splits = [{"type": "Split", "pattern": {"Regex": r}, "behavior": "Isolated", "invert": False}
              for r in ((regex,) if isinstance(regex, str) else regex)]
    raw["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        *splits, {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]}
    (folder / "tokenizer.json").write_text(json.dumps(raw, ensure_ascii=False))
    return folder


@pytest.fixture(scope="module")
def split_regex_tokenizers(tmp_path_factory, llama) -> dict[str, Path]:
    from litllm.gguf_export import PRE_TOKENIZER_REGEXES

    root = tmp_path_factory.mktemp("gguf_regex")
    return {pre: with_split_regex(llama, root / pre, regex) for regex, pre in PRE_TOKENIZER_REGEXES.items()
            if pre != "gpt-2"}


def export(folder: Path, outtype: str = "f32", name: str | None = None, **kwargs) -> Path:
    out = folder / (name or f"model-{outtype}.gguf")
    if not out.is_file():
        convert_to_gguf(folder, out, outtype=outtype, **kwargs)
    return out


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a GGUF file, dequantized to float32 by the gguf package, in (rows, columns) order."""
    from gguf.quants import dequantize

    reader = gguf.GGUFReader(path)
    return {t.name: torch.from_numpy(dequantize(t.data, t.tensor_type).copy()).float() for t in reader.tensors}


# ---------------------------------------------------------------------- the gguf reader reads it back
def test_f32_tensors_are_the_weights(llama):
    """f32: every tensor bit for bit, litllm's fused q|k|v split and Q/K in llama.cpp's interleaved rope order."""
    from litllm.config import Config
    from litllm.model_folder import read_safetensors

    tensors = read_tensors(export(llama))
    lit = read_safetensors(llama / "lit_model.safetensors")
    config = Config.from_checkpoint(llama)
    assert torch.equal(tensors["token_embd.weight"], lit["wte.weight"])
    assert torch.equal(tensors["output.weight"], lit["lm_head.weight"])
    assert torch.equal(tensors["output_norm.weight"], lit["norm_f.weight"])
    for i in range(config.n_layer):
        q, k, v = lit[f"blocks.{i}.attn.qkv.weight"].split(
            [config.n_head * config.head_size] + [config.n_query_groups * config.head_size] * 2)
        half = config.head_size // 2
        # llama.cpp rotates pairs (2j, 2j+1); HF/litllm rotate (j, j + half): row 2j of a head is HF row j
        gq = tensors[f"blk.{i}.attn_q.weight"].reshape(config.n_head, half, 2, -1)
        assert torch.equal(gq[:, :, 0], q.reshape(config.n_head, 2, half, -1)[:, 0])
        assert torch.equal(gq[:, :, 1], q.reshape(config.n_head, 2, half, -1)[:, 1])
        gk = tensors[f"blk.{i}.attn_k.weight"].reshape(config.n_query_groups, half, 2, -1)
        assert torch.equal(gk[:, :, 1], k.reshape(config.n_query_groups, 2, half, -1)[:, 1])
        assert torch.equal(tensors[f"blk.{i}.attn_v.weight"], v)
        gate, up = lit[f"blocks.{i}.mlp.fc.weight"].chunk(2)
        assert torch.equal(tensors[f"blk.{i}.ffn_gate.weight"], gate)
        assert torch.equal(tensors[f"blk.{i}.ffn_up.weight"], up)
        assert torch.equal(tensors[f"blk.{i}.ffn_down.weight"], lit[f"blocks.{i}.mlp.proj.weight"])
        assert torch.equal(tensors[f"blk.{i}.attn_output.weight"], lit[f"blocks.{i}.attn.proj.weight"])
        assert torch.equal(tensors[f"blk.{i}.attn_norm.weight"], lit[f"blocks.{i}.norm_1.weight"])
        assert torch.equal(tensors[f"blk.{i}.ffn_norm.weight"], lit[f"blocks.{i}.norm_2.weight"])
    assert len(tensors) == 3 + 9 * config.n_layer


@pytest.mark.parametrize("outtype", ["f16", "bf16", "q8_0", "q4_0"])
def test_lower_precision_tensors_read_back(llama, outtype):
    """f16/bf16: exactly the f32 weights rounded to that type; q8_0/q4_0: within half a quantization step
    of each 32-value block's scale; norms stay f32."""
    reference = read_tensors(export(llama))
    path = export(llama, outtype)
    reader = gguf.GGUFReader(path)
    types = {t.name: t.tensor_type for t in reader.tensors}
    tensors = read_tensors(path)
    assert tensors.keys() == reference.keys()
    for name, want in reference.items():
        got = tensors[name]
        assert got.shape == want.shape, name
        if want.ndim == 1:
            assert types[name] == gguf.GGMLQuantizationType.F32 and torch.equal(got, want), name
        elif outtype in ("f16", "bf16"):
            dtype = torch.float16 if outtype == "f16" else torch.bfloat16
            assert torch.equal(got, want.to(dtype).float()), name
        else:
            levels = 127 if outtype == "q8_0" else 8
            step = want.reshape(-1, 32).abs().amax(dim=1, keepdim=True) / levels
            # the scale itself is stored as f16: allow its rounding on top of half a step
            err = (got.reshape(-1, 32) - want.reshape(-1, 32)).abs()
            assert (err <= step * (0.5 if outtype == "q8_0" else 1.0) + want.reshape(-1, 32).abs() * 2e-3 + 1e-7).all(), name
    assert path.stat().st_size < export(llama).stat().st_size


# ---------------------------------------------------------------------- transformers' GGUF loader
@pytest.mark.parametrize("family", ["llama", "llama-tied-mqa", "qwen2", "qwen3-gguf", "phi3", "qwen3_moe-gguf"])
def test_transformers_loads_it_with_litllm_logits(tmp_path, family):
    """transformers' own GGUF loader (which undoes llama.cpp's layout) gives litllm's logits within 1e-4
    (8 tokens: within Phi-3's sliding window of 10, which neither llama.cpp nor this loader applies)."""
    import transformers

    from litllm.model import GPT

    folder = checkpoint(tmp_path / family, family, pad_token="<unk>" if family == "phi3" else None)
    out = export(folder)
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=out.name, dtype=torch.float32).eval()
    lit = GPT.from_checkpoint(folder).eval()
    ids = torch.randint(0, lit.config.vocab_size, (2, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, lit(ids), atol=1e-4, rtol=0)


# ---------------------------------------------------------------------- the tokenizer travels with it
@pytest.mark.parametrize("layout", ["byte-level", "sentencepiece"])
def test_tokenizer_metadata_round_trip(llama, llama_spm, layout):
    """tokenizer.ggml.* holds the vocabulary in id order, the merges or scores, the special ids and
    add-BOS, and transformers' GGUF tokenizer built from them encodes as litllm's tokenizer does."""
    import transformers

    from litllm.tokenizer import Tokenizer

    folder = llama if layout == "byte-level" else llama_spm
    path = export(folder)
    reader = gguf.GGUFReader(path)

    def value(key):
        return reader.fields[key].contents()

    raw = json.loads((folder / "tokenizer.json").read_text())
    vocab = {**raw["model"]["vocab"], **{t["content"]: t["id"] for t in raw["added_tokens"]}}
    tokens = value("tokenizer.ggml.tokens")
    assert all(tokens[i] == text for text, i in vocab.items())
    tok = Tokenizer(folder)
    assert value("tokenizer.ggml.bos_token_id") == tok.bos_id
    assert value("tokenizer.ggml.eos_token_id") == tok.eos_id
    assert value("tokenizer.ggml.add_bos_token") == tok.add_bos is True
    if layout == "byte-level":
        assert value("tokenizer.ggml.model") == "gpt2" and value("tokenizer.ggml.pre") == "gpt-2"
        assert value("tokenizer.ggml.merges") == [" ".join(m) if isinstance(m, list) else m for m in raw["model"]["merges"]]
    else:
        assert value("tokenizer.ggml.model") == "llama" and value("tokenizer.ggml.add_space_prefix") is True
        types = value("tokenizer.ggml.token_type")
        assert types[vocab["<0x41>"]] == gguf.TokenType.BYTE and types[vocab["<s>"]] == gguf.TokenType.CONTROL
    hf = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=path.name)
    for text in STRINGS + [SAMPLE_TEXT]:
        assert hf(text)["input_ids"] == tok.encode(text).tolist(), text


def test_split_regexes_match_with_literal_line_breaks(tmp_path, llama):
    """DeepSeek-V3's tokenizer.json spells the carriage return and newline in its regexes as the characters
    themselves: the same regexes, so the same llama.cpp pre-tokenizer."""
    from litllm.gguf_export import PRE_TOKENIZER_REGEXES, read_vocab

    regexes = next(key for key, pre in PRE_TOKENIZER_REGEXES.items() if pre == "deepseek-v3")
    literal = tuple(r.replace(r"\r", "\r").replace(r"\n", "\n") for r in regexes)
    assert literal != regexes
    folder = with_split_regex(llama, tmp_path / "deepseek", literal)
    assert read_vocab(folder, 320).pre == "deepseek-v3"


def test_chat_template_travels(tmp_path, llama):
    folder = tmp_path / "chat"
    shutil.copytree(llama, folder)
    template = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps(dict(config, chat_template=template)))
    reader = gguf.GGUFReader(export(folder, name="chat.gguf"))
    assert reader.fields["tokenizer.chat_template"].contents() == template


# ---------------------------------------------------------------------- refusals: one line, nothing written
def test_refusals_write_nothing(tmp_path, llama):
    from litllm.config import Config

    out = tmp_path / "out.gguf"
    with pytest.raises(LitLLMError, match="--outtype: expected one of f32, f16"):
        convert_to_gguf(llama, out, outtype="q4_k_m")
    with pytest.raises(LitLLMError, match="is a folder; expected the path of the .gguf file"):
        convert_to_gguf(llama, tmp_path)
    stablelm = tmp_path / "stablelm"
    shutil.copytree(llama, stablelm)
    config = Config.from_checkpoint(llama).to_dict()
    Config(**dict(config, hf_model_type="stablelm")).save(stablelm / "model_config.yaml")
    with pytest.raises(LitLLMError, match=r"\(stablelm\): no GGUF export for this family yet"):
        convert_to_gguf(stablelm, out)
    odd = tmp_path / "odd_tokenizer"
    shutil.copytree(llama, odd)
    raw = json.loads((odd / "tokenizer.json").read_text())
    raw["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": r"\p{N}|[^\p{N}]+"}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]}
    (odd / "tokenizer.json").write_text(json.dumps(raw))
    with pytest.raises(LitLLMError, match=r"split regex .* is not one llama.cpp implements"):
        convert_to_gguf(odd, out)
    assert not out.exists() and list(tmp_path.glob(".out.gguf*")) == []


def test_a_failed_export_leaves_the_old_file(tmp_path, llama, monkeypatch):
    """A failure mid-write (here the 5th tensor) leaves the previous file as it was and no temporary file."""
    import litllm.gguf_export as gguf_export

    out = tmp_path / "model.gguf"
    out.write_bytes(b"previous export")
    made = []

    def failing(self):
        made.append(self.name)
        if len(made) == 5:
            raise RuntimeError("disk trouble")
        return real(self)

    real = gguf_export._Tensor.data
    monkeypatch.setattr(gguf_export._Tensor, "data", failing)
    with pytest.raises(RuntimeError, match="disk trouble"):
        convert_to_gguf(llama, out)
    assert out.read_bytes() == b"previous export" and sorted(p.name for p in tmp_path.iterdir()) == ["model.gguf"]


def test_gemma2_attention_scale_llama_cpp_cannot_run_is_refused(tmp_path):
    folder = checkpoint(tmp_path / "gemma2", "gemma2")  # query_pre_attn_scalar 24, head_dim 16
    with pytest.raises(LitLLMError, match="attention_scores_scalar 24 differs from head_size 16"):
        convert_to_gguf(folder, tmp_path / "g.gguf")


@pytest.mark.parametrize("family, change, message", [
    ("qwen3_moe", {}, r"dense_mlp_layers \[1\]; llama.cpp's qwen3moe graph runs every layer as MoE"),
    ("olmoe", {}, "n_query_groups 2 differs from n_head 4; llama.cpp's olmoe graph norms K over n_embd rows"),
    ("olmoe-gguf", {"moe_normalize_topk": True}, "moe_normalize_topk true; llama.cpp's olmoe graph does not renormalize"),
    ("olmoe-gguf", {"tie_embeddings": True}, "tie_embeddings true; llama.cpp's olmoe graph needs its own output head"),
    ("smollm3", {"nope_layer_period": 3}, "nope_layer_period 3; llama.cpp's smollm3 graph skips rope in every 4th layer"),
    ("olmo3", {"rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32,
                                "beta_fast": 16}}, "rope_scaling beta_fast 16; the GGUF export writes YaRN with beta_fast 32"),
    ("olmo2", {"tie_embeddings": True}, "tie_embeddings true; llama.cpp's olmo2 graph needs its own output head"),
    ("olmo3", {"sliding_window_period": None}, "sliding_window_period None; llama.cpp's olmo2 graph needs n - 1"),
    ("gpt_oss", {}, "swiglu_limit 0.1; llama.cpp's gpt-oss graph uses 7.0"),
    ("llama4", {}, "attention_chunk_size 16; llama.cpp's llama4 graph uses 8192"),
    ("deepseek_v2", {}, "moe_scoring 'softmax' with n_expert_groups 4; llama.cpp's deepseek2 graph scores a group by"),
    ("deepseek_v3", {"rope_interleaved": False}, "rope_interleaved false; llama.cpp's deepseek2 graph ropes interleaved"),
    ("deepseek_v3", {"rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32,
                                      "mscale": 1.0, "mscale_all_dim": 0.5}},
     "rope_scaling mscale 1.0 and mscale_all_dim 0.5; llama.cpp's deepseek2 graph needs them set and equal"),
    ("ministral3", {"query_scale_length": 32}, "query_scale_length 32; llama.cpp's mistral3 graph steps the query"),
    ("ministral3", {"rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16,
                                     "mscale": 2.0, "mscale_all_dim": 1.0}},
     "rope_scaling mscale 2.0; llama.cpp's mistral3 graph takes mscale 1 beside mscale_all_dim"),
    ("llama4-gguf", {"dense_mlp_layers": [1, 3]}, r"dense_mlp_layers \[1, 3\]; llama.cpp's llama4 graph runs MoE in every"),
    ("glm4_moe", {"dense_mlp_layers": [1]}, r"dense_mlp_layers \[1\]; llama.cpp's glm4_moe graph runs dense MLPs in the "
                                              "first layers only"),
])
def test_layouts_llama_cpp_cannot_run_are_refused(tmp_path, family, change, message):
    from litllm.config import Config

    folder = checkpoint(tmp_path / family, family)
    if change:
        Config(**dict(Config.from_checkpoint(folder).to_dict(), **change)).save(folder / "model_config.yaml")
    with pytest.raises(LitLLMError, match=message):
        convert_to_gguf(folder, tmp_path / "m.gguf")
    assert not (tmp_path / "m.gguf").exists()


def test_gpt_oss_untruncated_yarn_is_exported_with_a_note(tmp_path, capsys):
    """The released gpt-oss models' YaRN (truncate false) has no GGUF form: llama.cpp runs it truncated, as in the
    files its own converter writes; the export says so."""
    from litllm.config import Config

    folder = checkpoint(tmp_path / "gpt_oss", "gpt_oss-gguf")
    config = Config.from_checkpoint(folder).to_dict()
    Config(**dict(config, rope_scaling=dict(config["rope_scaling"], truncate=False))).save(folder / "model_config.yaml")
    convert_to_gguf(folder, tmp_path / "m.gguf")
    assert "note: rope_scaling truncate false: llama.cpp ropes YaRN with its correction range truncated" in (
        capsys.readouterr().out)
    assert gguf.GGUFReader(tmp_path / "m.gguf").fields["gpt-oss.rope.scaling.type"].contents() == "yarn"


def test_cli(llama, tmp_path, capsys):
    from litllm.__main__ import main

    out = tmp_path / "cli.gguf"
    main(["convert_to_gguf", str(llama), str(out), "--outtype", "q8_0"])
    assert gguf.GGUFReader(out).fields["general.file_type"].contents() == gguf.LlamaFileType.MOSTLY_Q8_0
    with pytest.raises(SystemExit):
        main(["convert_to_gguf", str(llama), str(out), "--outtype", "q3"])
    assert "error: --outtype: expected one of" in capsys.readouterr().err


# ---------------------------------------------------------------------- a LoRA adapter
def lora_run(base: Path, folder: Path, **flags) -> Path:
    """A LoRA run's folder on `base` with random (non-zero) A and B, as `finetune_lora` writes it."""
    from litllm.lora import LoRASettings, add_lora
    from litllm.model import GPT

    settings = LoRASettings(**flags)
    model = add_lora(GPT.from_checkpoint(base), **{k: v for k, v in vars(settings).items()})
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(name)))
    write_lora_folder(model, folder, {"checkpoint_dir": str(base), **settings.to_flags()})
    return folder


@pytest.mark.parametrize("family", ["llama", "phi3", "ministral3"])
def test_adapter_applied_over_base_is_the_merged_model(tmp_path, family):
    """What llama.cpp computes with `--lora` (W + alpha/rank * B @ A per tensor, rank read from the tensor)
    equals the GGUF export of the merged model, for per-part tensors (llama's q/k/v, with the rope row
    order) and fused ones (Phi-3's attn_qkv, ffn_up)."""
    from litllm.lora import merge_lora

    base = checkpoint(tmp_path / family, family, pad_token="<unk>" if family == "phi3" else None)
    run = lora_run(base, tmp_path / "run", r=4, alpha=8.0, query=True, key=True, value=False, mlp=True)
    adapter = tmp_path / "adapter.gguf"
    convert_to_gguf(run, adapter, outtype="f32", adapter_only=True)
    merge_lora(run, out_dir=tmp_path / "merged")
    base_tensors, merged = read_tensors(export(base)), read_tensors(export(tmp_path / "merged"))
    reader = gguf.GGUFReader(adapter)
    assert reader.fields["general.type"].contents() == "adapter"
    alpha = reader.fields["adapter.lora.alpha"].contents()
    lora = read_tensors(adapter)
    adapted = {name.removesuffix(".lora_a") for name in lora if name.endswith(".lora_a")}
    assert adapted and adapted < base_tensors.keys()
    for name, weight in base_tensors.items():
        if name in adapted:
            a, b = lora[name + ".lora_a"], lora[name + ".lora_b"]
            weight = weight + alpha / a.shape[0] * (b @ a)
        torch.testing.assert_close(weight, merged[name], atol=1e-5, rtol=0, msg=name)


@pytest.mark.parametrize("family, flags, message", [
    ("deepseek_v3", dict(query=False, key=True, value=False), "a LoRA on MLA's keys and values \\(kv_b\\) has no GGUF"),
    ("llama4-gguf", dict(query=True, key=False, value=False, mlp=True), "a LoRA on MoE experts has no GGUF LoRA form"),
])
def test_adapters_llama_cpp_cannot_apply_are_refused(tmp_path, family, flags, message):
    run = lora_run(checkpoint(tmp_path / family, family), tmp_path / "run", r=4, alpha=8.0, **flags)
    with pytest.raises(LitLLMError, match=message):
        convert_to_gguf(run, tmp_path / "adapter.gguf", adapter_only=True)
    assert not (tmp_path / "adapter.gguf").exists()


def test_adapter_only_needs_a_lora_run(llama, tmp_path):
    with pytest.raises(LitLLMError, match="lit_lora.safetensors"):
        convert_to_gguf(llama, tmp_path / "a.gguf", adapter_only=True)


# ---------------------------------------------------------------------- llama.cpp itself
def llama_cpp_model(path: Path, lora: Path | None = None):
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (see tutorials/deploy.md; CI doesn't build it)")
    return llama_cpp_check.llama_cpp_model(path, lora)


LLAMA_CPP_FAMILIES = ["llama", "llama-linear-mqa", "llama3.1", "mistral", "mixtral", "qwen2", "qwen3", "gemma",
                      "gemma2-gguf", "gemma2-27b-layout", "gemma3", "phi3", "qwen3_moe-gguf", "olmoe-gguf", "granite", "smollm3", "olmo2", "olmo3",
                      "glm4_moe", "gpt_oss-gguf", "llama4-gguf", "ministral3-yarn", "deepseek_v3",
                      "deepseek_v2-gguf"]


@pytest.mark.parametrize("outtype", ["f32", "f16"])
@pytest.mark.parametrize("family", LLAMA_CPP_FAMILIES)
def test_llama_cpp_greedy_tokens_and_logits_match_litllm(tmp_path, family, outtype):
    """llama.cpp runs the exported file: the same greedy tokens as litllm's engine, and (f32) the same
    prompt logits within llama.cpp's own float error."""
    from litllm.model import GPT
    from litllm.tokenizer import Tokenizer

    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    # (llama.cpp expects Phi-3's <|endoftext|> in any model whose general.name says phi3; the tiny vocabulary lacks it)
    folder = checkpoint(tmp_path / ("tiny" if family == "phi3" else family), family)
    llm = llama_cpp_model(export(folder, outtype))
    prompt = Tokenizer(folder).encode("The quick brown fox").tolist()
    n = 12
    if family in ("mistral", "phi3"):  # stay inside their sliding windows (8, 10), which llama.cpp doesn't apply
        prompt, n = prompt[:3], 5
    assert llama_cpp_greedy(llm, prompt, n) == litllm_greedy(folder, prompt, n)
    if outtype == "f32":
        llm.reset()
        llm.eval(prompt)
        model = GPT.from_checkpoint(folder).eval()
        with torch.no_grad():
            want = model(torch.tensor([prompt]))[0]
        got = torch.from_numpy(llm.scores[: len(prompt)].copy())
        # compared before Granite's logits division (16), which would shrink any difference as much
        scale = model.config.logits_divisor
        torch.testing.assert_close(got * scale, want * scale, atol=2e-3, rtol=0)


# llama.cpp's own converter, run on the tiny HF model where LLAMA_CPP_SRC names llama.cpp's sources (e.g.
# llama_cpp_python-*/vendor/llama.cpp). The tiny tokenizer is none of the checkpoints its pre-tokenizer table knows,
# so it writes the vocabulary as GPT-2's here (the tokenizer has its own tests above)
CONVERTER = """
import runpy, sys
src, folder, out = sys.argv[1:]
sys.path[:0] = [src, src + "/gguf-py"]
import conversion.base as base
base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "gpt-2"
base.TextModel._set_vocab_glm = base.TextModel._set_vocab_gpt2
sys.argv = ["convert_hf_to_gguf.py", folder, "--outfile", out, "--outtype", "f32"]
runpy.run_path(src + "/convert_hf_to_gguf.py", run_name="__main__")
"""


@pytest.mark.slow
@pytest.mark.parametrize("family", ["glm4_moe", "gpt_oss-gguf", "llama4-gguf", "ministral3-yarn", "deepseek_v3",
                                    "deepseek_v2-gguf"])
def test_tensors_are_llama_cpp_converters(tmp_path, family):
    """The newer families' tensors (names, shapes, values: experts split and stacked, MLA's kv_b split) are what
    llama.cpp's `convert_hf_to_gguf.py` writes from the same HF model, and the hyper-parameters it writes agree."""
    import os
    import subprocess
    import sys

    src = os.environ.get("LLAMA_CPP_SRC")
    if not src:
        pytest.skip("set LLAMA_CPP_SRC to llama.cpp's source folder (convert_hf_to_gguf.py) to compare with it")
    folder = checkpoint(tmp_path / family, family)
    # llama.cpp's converter splits kv_b by num_key_value_heads, which the released DeepSeek-V3 sets to n_head
    if family == "deepseek_v3":
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps(dict(config, num_key_value_heads=config["num_attention_heads"])))
    reference = tmp_path / "llama_cpp.gguf"
    subprocess.run([sys.executable, "-c", CONVERTER, src, str(folder), str(reference)], check=True, capture_output=True)
    ours, theirs = read_tensors(export(folder)), read_tensors(reference)
    assert ours.keys() == theirs.keys()
    for name, tensor in ours.items():
        torch.testing.assert_close(tensor, theirs[name], atol=1e-6, rtol=0, msg=name)  # rope_freqs: float rounding

    def keys(path: Path) -> dict:
        reader = gguf.GGUFReader(path)
        arch = reader.fields["general.architecture"].contents()
        return {k: f.contents() for k, f in reader.fields.items() if k.startswith(arch + ".")}

    mine, reference_keys = keys(export(folder)), keys(reference)
    for key in mine.keys() & reference_keys.keys():
        assert mine[key] == pytest.approx(reference_keys[key]), key


@pytest.mark.parametrize("layout", ["byte-level", "llama-bpe", "qwen2", "gpt-4o", "tekken", "deepseek-v3",
                                    "sentencepiece",
                                    "sentencepiece-no-prefix"])
def test_llama_cpp_tokenizes_as_litllm(llama, llama_spm, gemma_spm, split_regex_tokenizers, layout):
    """llama.cpp's tokenizer, set up from the exported metadata alone (the pre-tokenizer type read from the
    split regex), gives litllm's ids and text: GPT-2's, Llama 3's and Qwen 2's regexes, SentencePiece-style."""
    from litllm.tokenizer import Tokenizer

    folder = {"byte-level": llama, "sentencepiece": llama_spm, "sentencepiece-no-prefix": gemma_spm,
              **split_regex_tokenizers}[layout]
    if layout in split_regex_tokenizers:
        assert gguf.GGUFReader(export(folder)).fields["tokenizer.ggml.pre"].contents() == layout
    llm = llama_cpp_model(export(folder))
    tok = Tokenizer(folder)
    for text in STRINGS + SAMPLE_TEXT.splitlines() + [SAMPLE_TEXT]:
        assert llm.tokenize(text.encode(), add_bos=True, special=False) == tok.encode(text, bos=True).tolist(), text
        ids = tok.encode(text, bos=False).tolist()
        assert llama_cpp_detokenize(llm, ids) == tok.decode(ids), text


def test_llama_cpp_applies_the_adapter_as_the_merged_model(tmp_path, llama):
    from litllm.lora import merge_lora
    from litllm.tokenizer import Tokenizer

    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    run = lora_run(llama, tmp_path / "run", r=4, alpha=8.0, query=True, key=True, value=True, mlp=True)
    convert_to_gguf(run, tmp_path / "adapter.gguf", outtype="f32", adapter_only=True)
    merge_lora(run, out_dir=tmp_path / "merged")
    prompt = Tokenizer(llama).encode("The quick brown fox").tolist()
    with_lora = llama_cpp_greedy(llama_cpp_model(export(llama), tmp_path / "adapter.gguf"), prompt, 12)
    assert with_lora == litllm_greedy(tmp_path / "merged", prompt, 12)
    assert with_lora != litllm_greedy(llama, prompt, 12)  # the adapter changes what the model says
