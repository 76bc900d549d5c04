"""The shared training machinery: one loop (`loop.run`) for pretraining and every finetuning method.

args.py         TrainArgs, EvalArgs (the `--train.*` / `--eval.*` flags)
loop.py         Method (transform / trainable / export) and run(): the training loop
fabric.py       Fabric, strategy (single / DDP / FSDP2) and precision setup; model preparation
schedule.py     linear warmup + cosine decay
optimizer.py    any torch.optim class from `--optimizer`
checkpoints.py  atomic step-XXXXXXXX/ checkpoints, resume, `convert_pretrained_checkpoint`
flops.py        FLOPs per token, device peaks, throughput and MFU
loggers.py      csv / tensorboard / wandb loggers, the loss-curve PNG
"""

from litllm.train.args import EvalArgs, TrainArgs
from litllm.train.loop import Method, TrainResult, run

__all__ = ["EvalArgs", "Method", "TrainArgs", "TrainResult", "run"]
