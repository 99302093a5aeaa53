"""Byte-level BPE tokenizer: training with HF `tokenizers`, saving for `transformers`.

The saved directory loads with `transformers.AutoTokenizer.from_pretrained(dir)`:
`tokenizer.json` plus `tokenizer_config.json` naming bos/eos/pad and holding the
chat template. Encoding adds no special tokens; the Megatron datasets append
`</s>` after each document themselves.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

BOS, EOS, PAD = "<s>", "</s>", "<pad>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")
SPECIAL_TOKENS = (BOS, EOS, PAD, *ROLE_TOKENS)  # ids 0..5, in this order
# Downstream SFT formats conversations with exactly this template.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def train_bpe(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """Return a byte-level BPE tokenizer trained on `texts`, special tokens first."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=True,
    )
    tok.train_from_iterator(texts, trainer)
    return tok


def save_for_transformers(tok: Tokenizer, out_dir: Path) -> None:
    """Save `tok` as a directory `AutoTokenizer.from_pretrained` loads, with bos/eos/pad and chat template."""
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        additional_special_tokens=list(ROLE_TOKENS),
        clean_up_tokenization_spaces=False,  # decode(encode(text)) == text
    )
    hf.chat_template = CHAT_TEMPLATE
    hf.save_pretrained(out_dir, save_jinja_files=False)  # template inside tokenizer_config.json
    # transformers 5 writes its own class name "TokenizersBackend"; name the class that
    # transformers 4 readers (vLLM, TensorRT-LLM) know too, and 5 maps to the same class.
    config_path = Path(out_dir) / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
