"""Alignment: preference data, reward model, DPO/IPO/hinge (TRL), RLHF with PPO and GRPO (ours), SteerLM."""
