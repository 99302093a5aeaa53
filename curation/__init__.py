"""Curation: readers, cleaning, filters, dedup, tokenizer training, Megatron indexed datasets."""
