#!/usr/bin/env bash
# Lean CPU install of litllm with every extra and the test dependencies.
#
# litdata declares torchvision (used only for image data), which would pull a multi-GB CUDA
# build of torch. On CPU-only machines we install the CPU torch wheel, litdata without its
# declared dependencies, and litdata's remaining dependencies explicitly. Likewise xgrammar
# declares triton (its CUDA kernels, 286 MB): installed without it, xgrammar's CPU path needs
# only apache-tvm-ffi beside what the other extras bring. Everything else comes
# from pyproject.toml. On GPU machines just run `pip install -e ".[all]"`.
set -euo pipefail
cd "$(dirname "$0")/.."

python -m pip install -q "torch==2.13.0" || python -m pip install -q torch
LITDATA=$(python - <<'PY'
import tomllib
deps = tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]
print(next(d for d in deps if d.startswith("litdata")))
PY
)
python -m pip install -q --no-deps "$LITDATA"
python -m pip install -q lightning-utilities filelock numpy boto3 requests "urllib3>=1.26" tifffile obstore
# pyproject's dependencies and extras, minus litdata (installed above) and xgrammar (below)
python - <<'PY' > /tmp/litllm-reqs.txt
import re, tomllib
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
extras = project["optional-dependencies"]
reqs = list(project["dependencies"])
for name in ("quant", "torchao", "eval", "loggers", "pretrain", "serve", "gguf", "test"):
    reqs += [r for r in extras[name] if not r.startswith("litllm[")]
print("\n".join(r for r in reqs if not r.startswith(("litdata", "xgrammar"))))
print(next(r for r in extras["serve"] if r.startswith("xgrammar")), file=open("/tmp/litllm-xgrammar.txt", "w"))
PY
python -m pip install -q -r /tmp/litllm-reqs.txt
python -m pip install -q --no-deps -r /tmp/litllm-xgrammar.txt "apache-tvm-ffi>=0.1.11"
python -m pip install -q --no-deps -e .
