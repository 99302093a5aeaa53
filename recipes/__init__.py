"""Recipes: model configs, megatron-core pretraining, SFT/LoRA, evaluation, HF export."""
