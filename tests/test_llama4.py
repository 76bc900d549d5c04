"""Llama 4 beyond the parity tests of test_model_parity.py: a multimodal folder converts to its text model,
LoRA finetuning runs and its PEFT export loads in transformers + peft, and `estimate` holds for it."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import json_file, make_converted_checkpoint
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


def test_lora_finetune_runs_and_its_peft_export_loads(llama4_base, tmp_path_factory, tmp_path):
    """`--lora_mlp` adapts the routed experts too: their LoRA exports as PEFT `target_parameters` on the stacked
    `experts.gate_up_proj` / `down_proj`, the dense and shared-expert MLPs as modules."""
    peft = pytest.importorskip("peft")
    import transformers

    from litllm.data import JSON
    from litllm.finetune import finetune_lora
    from litllm.lora import load_lora_model, save_peft_adapter
    from litllm.train.args import EvalArgs, TrainArgs

    records = [{"instruction": f"Say the number {i}", "output": f"The number is {i}."} for i in range(16)]
    result = finetune_lora(
        llama4_base, out_dir=tmp_path / "run", accelerator="cpu", precision="32-true", logger_name="csv",
        lora_mlp=True,
        data=JSON(json_path=json_file(tmp_path_factory, records), val_split_fraction=0.1, prompt_style="default"),
        train=TrainArgs(global_batch_size=4, micro_batch_size=2, max_steps=4, lr_warmup_steps=1, save_interval=None,
                        max_seq_length=40),
        eval=EvalArgs(interval=1000, max_iters=1, final_validation=False),
        optimizer={"class_path": "torch.optim.AdamW", "init_args": {"lr": 2e-2, "weight_decay": 0.0}},
    )
    assert result.losses[4] < result.losses[1]
    model = load_lora_model(result.final_dir).eval()
    save_peft_adapter(model, tmp_path / "peft")
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert "model.layers.1.feed_forward.experts.gate_up_proj" in config["target_parameters"]
    hf = transformers.AutoModelForCausalLM.from_pretrained(llama4_base, dtype=torch.float32).eval()
    peft_model = peft.PeftModel.from_pretrained(hf, tmp_path / "peft").eval()
    x = torch.randint(0, 300, (2, 36), generator=torch.Generator().manual_seed(0))  # spans 3 chunks of 16
    with torch.no_grad():
        expected = model(x)
        got = peft_model(x).logits
    torch.testing.assert_close(got, expected[..., : got.size(-1)], rtol=0, atol=1e-4)


def test_estimate_is_within_10_percent_of_the_measured_peak(llama4_base):
    from test_estimate import measured_peak, plan_for

    from litllm.config import Config
    from litllm.estimate import peak_memory

    plan = plan_for("llama", "lora", None, 2, False, config=Config.from_checkpoint(llama4_base))
    estimated, measured = peak_memory(plan)["total"], measured_peak(plan)["total"]
    assert abs(estimated - measured) <= 0.10 * measured, (estimated, measured)
