"""GRPO (group relative policy optimisation) for `litllm finetune_grpo`: online RL with rewards a program checks.

Each optimizer step takes B prompts, samples G completions of each on litllm's decode engine with the policy's
current weights (`rollout`), scores them (`rewards`), turns the scores into group-normalised advantages and
minimises TRL's clipped surrogate objective (`loss`), all as one `Method.loss` of the one training loop (`method`).
"""
