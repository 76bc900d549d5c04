"""Llama 4 beyond the parity tests of test_model_parity.py: a multimodal folder converts to its text model,
LoRA finetuning runs and its PEFT export loads in transformers + peft, and `estimate` holds for it."""

from __future__ import annotations

import pytest
import torch

from conftest import assert_peft_export_computes_the_same, finetune_lora_briefly, make_converted_checkpoint
from hf_models import FAMILIES, VOCAB, perturb
from litllm.convert import convert_to_litllm
from litllm.model import GPT, Llama4MoE


@pytest.fixture(scope="module")
def llama4_base(tmp_path_factory):
    return make_converted_checkpoint(tmp_path_factory.mktemp("llama4"), family="llama4")


def test_multimodal_folder_converts_to_its_text_model(tmp_path):
    """A Llama4ForConditionalGeneration folder: the text_config is read, the vision model and projector left
    out, and the converted model computes the language model's logits."""
    import transformers

    text = FAMILIES["llama4"][2]
    vision = dict(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_hidden_layers=1, image_size=28,
                  patch_size=14, vision_output_dim=32, projector_input_dim=32, projector_output_dim=32)
    config = transformers.Llama4Config(text_config=text, vision_config=vision)
    torch.manual_seed(0)
    hf = transformers.Llama4ForConditionalGeneration(config).eval()
    perturb(hf)
    hf.save_pretrained(tmp_path)
    convert_to_litllm(tmp_path)
    model = GPT.from_checkpoint(tmp_path).eval()
    assert model.config.hf_model_type == "llama4_text"
    assert [type(b.mlp) is Llama4MoE for b in model.blocks] == [False, True, False, True]
    idx = torch.randint(0, VOCAB, (1, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model(idx)[..., :VOCAB], hf(input_ids=idx).logits, atol=1e-4, rtol=0)


def test_lora_finetune_runs_and_its_peft_export_loads(llama4_base, numbers_file, tmp_path):
    """`--lora_mlp` adapts the routed experts too: their LoRA exports as PEFT `target_parameters` on the stacked
    `experts.gate_up_proj` / `down_proj`, the dense and shared-expert MLPs as modules."""
    pytest.importorskip("peft")
    result = finetune_lora_briefly(llama4_base, tmp_path / "run", numbers_file, dict(max_seq_length=40), lora_mlp=True)
    assert result.losses[4] < result.losses[1]
    # 36 tokens span 3 attention chunks of 16
    adapter = assert_peft_export_computes_the_same(result.final_dir, llama4_base, tmp_path / "peft", seq_len=36)
    assert "model.layers.1.feed_forward.experts.gate_up_proj" in adapter["target_parameters"]


def test_estimate_is_within_10_percent_of_the_measured_peak(llama4_base):
    from test_estimate import measured_peak, plan_for

    from litllm.config import Config
    from litllm.estimate import peak_memory

    plan = plan_for("llama", "lora", None, 2, False, config=Config.from_checkpoint(llama4_base))
    estimated, measured = peak_memory(plan)["total"], measured_peak(plan)["total"]
    assert abs(estimated - measured) <= 0.10 * measured, (estimated, measured)
