"""Peak memory of `convert_to_litllm` / `convert_from_litllm` on a ~500 MB sharded checkpoint.

Generates a random Llama checkpoint (fp32, sharded safetensors), then in fresh processes measures
peak RSS of: litllm's conversion both ways, and, side by side, transformers loading the same
checkpoint with `from_pretrained` (the memory a load-everything converter needs).

    python benchmarks/convert_memory.py [--params_m 125] [--workdir /tmp/convert-bench]
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

MAKE = """
import sys, torch, transformers
folder, layers = sys.argv[1], int(sys.argv[2])
config = transformers.LlamaConfig(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=layers,
                                  num_attention_heads=12, num_key_value_heads=4, max_position_embeddings=2048)
with torch.no_grad():
    model = transformers.LlamaForCausalLM(config)
model.save_pretrained(folder, max_shard_size="100MB")
"""

# each job prints its peak RSS (MiB) on the last line; the baseline is the interpreter + imports alone
JOBS = {
    "baseline (python + torch + litllm imports)": """
import torch, litllm.convert, safetensors
""",
    "litllm convert_to_litllm": """
import sys
from litllm.convert import convert_to_litllm
convert_to_litllm(sys.argv[1])
""",
    "litllm convert_from_litllm": """
import sys
from litllm.convert import convert_from_litllm
convert_from_litllm(sys.argv[1], sys.argv[2])
""",
    "transformers from_pretrained": """
import sys, transformers
transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1])
""",
}
FOOTER = "\nimport resource; print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=12, help="12 layers ~ 125M params ~ 500 MB in fp32")
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="litllm-convert-bench-"))
    ckpt, export = workdir / "hf", workdir / "export"
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    print(f"generating a {args.layers}-layer Llama checkpoint in {ckpt} ...")
    subprocess.run([sys.executable, "-c", MAKE, str(ckpt), str(args.layers)], check=True, capture_output=True)
    size_mb = sum(f.stat().st_size for f in ckpt.glob("*.safetensors")) / 2**20
    n_shards = len(list(ckpt.glob("*.safetensors")))
    print(f"checkpoint: {size_mb:.0f} MiB in {n_shards} shards\n")

    results = {}
    for name, code in JOBS.items():
        out = subprocess.run(
            [sys.executable, "-c", code + FOOTER, str(ckpt), str(export)], check=True, capture_output=True, text=True
        )
        results[name] = float(out.stdout.strip().splitlines()[-1])
    base = results["baseline (python + torch + litllm imports)"]
    print(f"{'job':45s} {'peak RSS MiB':>12s} {'above baseline':>15s} {'x checkpoint':>13s}")
    for name, rss in results.items():
        above = rss - base
        print(f"{name:45s} {rss:12.0f} {above:15.0f} {rss / size_mb:13.2f}")
    lit = results["litllm convert_to_litllm"] - base
    hf = results["transformers from_pretrained"] - base
    print(f"\nconvert_to_litllm needs {lit / size_mb:.2f}x the checkpoint size above baseline "
          f"(transformers from_pretrained: {hf / size_mb:.2f}x); ratio litllm/transformers = {lit / max(hf, 1):.2f}")
    json.dump({"checkpoint_mib": size_mb, "peak_rss_mib": results}, open(workdir / "results.json", "w"), indent=2)
    shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
