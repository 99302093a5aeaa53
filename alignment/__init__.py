"""Alignment: preference data and DPO (later reward models, PPO, GRPO, SteerLM)."""
