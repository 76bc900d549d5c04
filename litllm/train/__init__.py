"""The shared training machinery: one loop (`loop.setup` + `loop.fit`) for pretraining and every finetuning method.

args.py         TrainArgs, EvalArgs (the `--train.*` / `--eval.*` flags), RunArgs (the shared flat flags)
loop.py         Method (transform / trainable / export / loss / outputs), build_train_model, setup, fit
fabric.py       Fabric, strategy (single / DDP / FSDP2) and precision setup
schedule.py     linear warmup + cosine decay
optimizer.py    any torch.optim class from `--optimizer`
checkpoints.py  atomic step-XXXXXXXX/ checkpoints, resume, `convert_pretrained_checkpoint`
flops.py        FLOPs per token, device peaks, throughput and MFU
loggers.py      csv / tensorboard / wandb / mlflow loggers, the loss-curve PNG
fast_dev_run.py --fast_dev_run: a few steps of the recipe, a checkpoint round trip, in a temporary out_dir
provenance.py   provenance.yaml: litllm version and git commit, data fingerprint, device layout
"""

from litllm.train.args import EvalArgs, RunArgs, TrainArgs
from litllm.train.loop import Method, Trainer, TrainResult, build_train_model, fit, setup

__all__ = ["EvalArgs", "Method", "RunArgs", "TrainArgs", "TrainResult", "Trainer", "build_train_model", "fit", "setup"]
