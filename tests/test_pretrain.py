"""Tests of the pretrain stage: CPU shims, recipes, HF export, data blending, training, generation, the stage.

The GPU path's test runs only where CUDA is; resume after a kill is marked slow.

Inputs are built here: a byte-level BPE trained on Python's own docs and
Megatron indexed datasets written with megatron-core's builder, laid out as
the tokenize stage lays them out.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.presets import resolve_configs
from pipeline.runner import configs_to_json, execute_stage, make_plan
from recipes.stages import PretrainConfig

torch.set_num_threads(1)
pytestmark = [
    pytest.mark.filterwarnings("ignore:.*(Apex|Transformer Engine).* not installed:UserWarning"),
    pytest.mark.filterwarnings("ignore:full scope is deprecated:UserWarning"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning:megatron"),
    pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning"),
]

VOCAB = 500  # not a multiple of 64: the Megatron embedding is padded to 512, HF keeps 500
REPO = Path(__file__).resolve().parent.parent


def doc_texts() -> list[str]:
    """Return pydoc_data.topics split into paragraphs of at least 80 characters."""
    from pydoc_data.topics import topics

    paras = (p.strip() for t in sorted(topics) for p in re.split(r"\n\s*\n", topics[t]))
    return [p for p in paras if len(p) >= 80]


def write_tokenized(out: Path) -> Path:
    """Write what the tokenize stage writes (tokenizer/, data/{train,valid}.{bin,idx}) under `out`."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = doc_texts()
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=["<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(texts, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    tok.save_pretrained(out / "tokenizer")
    (out / "data").mkdir(parents=True)
    n_valid = len(texts) // 20
    for split, docs in (("train", texts[:-n_valid]), ("valid", texts[-n_valid:])):
        builder = IndexedDatasetBuilder(str(out / "data" / f"{split}.bin"), dtype=np.uint16)
        for enc in bpe.encode_batch(docs, add_special_tokens=False):
            ids = enc.ids + [tok.eos_token_id]
            builder.add_document(np.asarray(ids), [len(ids)])
        builder.finalize(str(out / "data" / f"{split}.idx"))
    return out


@pytest.fixture(scope="module")
def tokenized(tmp_path_factory) -> Path:
    return write_tokenized(tmp_path_factory.mktemp("tokenize"))


def micro():
    from recipes.models import get_model_recipe

    return get_model_recipe("micro")


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every weight large random values (norm weights around 1), so that mapping errors show."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            p.copy_(1.0 + 0.5 * noise if p.dim() == 1 else noise / math.sqrt(p.shape[-1]))
    return model


def layout_run_dir(run_dir: Path, tokenized: Path, configs: dict) -> Path:
    """Put `tokenized` at run_dir/tokenize with a completed manifest of the planned fingerprint."""
    shutil.copytree(tokenized, run_dir / "tokenize")
    fingerprint = make_plan(run_dir, configs, ["tokenize"])[0].fingerprint
    manifest = {
        "stage": "tokenize",
        "status": "completed",
        "fingerprint": fingerprint,
        "outputs": {"tokenizer": {"path": "tokenizer"}, "data": {"path": "data"}},
        "metrics": {},
    }
    (run_dir / "tokenize" / "manifest.json").write_text(json.dumps(manifest))
    return run_dir


# --- CPU shims -------------------------------------------------------------------------------


def test_cpu_shims_are_current_and_megatron_trains_on_cpu():
    from megatron.core.models.common.embeddings import rotary_pos_embedding
    from megatron.core.transformer import attention

    from recipes.cpu_shims import check_cpu_shims
    from recipes.megatron_model import build_gpt_model

    check_cpu_shims()
    model = build_gpt_model(micro(), VOCAB, seed=0)
    tokens = torch.randint(0, VOCAB, (2, 32))
    loss = model(tokens, None, None, labels=tokens.roll(-1, 1)).mean()
    loss.backward()
    assert abs(loss.item() - math.log(512)) < 0.1  # a fresh model predicts ~uniformly over its 512 rows
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    assert sum(p.numel() for p in model.parameters()) == micro().num_params(512)
    # only the rotary and attention modules see a CPU "current device"; torch.cuda itself is untouched
    assert rotary_pos_embedding.torch.cuda.current_device() == "cpu"
    assert attention.torch.cuda.current_device() == "cpu"
    with pytest.raises((AssertionError, RuntimeError)):
        torch.cuda.current_device()


def test_swiglu_equals_megatrons_glu_in_value_and_gradient():
    import torch.nn.functional as F

    from recipes.megatron_model import SwiGLU

    y = torch.randn(16, 2, 2 * 48, generator=torch.Generator().manual_seed(0), requires_grad=True)  # [s, b, 2f]
    grad = torch.randn(16, 2, 48, generator=torch.Generator().manual_seed(1))
    gate, up = torch.chunk(y, 2, dim=-1)
    reference = F.silu(gate) * (up + 0.0)  # megatron MLP's glu (glu_linear_offset 0)
    (expected,) = torch.autograd.grad(reference, y, grad)
    out = SwiGLU.apply(y)
    (got,) = torch.autograd.grad(out, y, grad)
    assert torch.equal(out, reference) and torch.allclose(got, expected, rtol=1e-6, atol=1e-7)
    assert torch.autograd.gradcheck(SwiGLU.apply, (y.detach().double().requires_grad_(),))


def test_cpu_shims_check_fails_loudly_when_megatron_changes(monkeypatch):
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    from recipes import cpu_shims

    # each patched module is pinned by the source line its shim answers: a CPU-aware upgrade drops it
    module = "megatron.core.models.common.embeddings.rotary_pos_embedding"
    monkeypatch.setitem(cpu_shims.CUDA_MODULES, module, "torch.cuda.no_longer_called()")
    with pytest.raises(RuntimeError, match="rotary_pos_embedding no longer has"):
        cpu_shims.check_cpu_shims()
    monkeypatch.undo()

    def get_tensor(self, tensor_shape, dtype, name, mem_alloc_context=None):  # a new signature upstream
        return None

    monkeypatch.setattr(cpu_shims.GlobalMemoryBuffer, "get_tensor", get_tensor)
    with pytest.raises(RuntimeError, match="GlobalMemoryBuffer.get_tensor"):
        cpu_shims.check_cpu_shims()
    assert RotaryEmbedding.get_emb  # untouched


def test_cpu_grad_clipping_scales_as_megatrons_and_as_torch():
    from recipes.cpu_shims import clip_grad_by_total_norm_cpu

    params = [torch.nn.Parameter(torch.randn(5, 3)) for _ in range(3)]
    for p in params:
        p.grad = torch.randn_like(p)
    reference = [p.grad.clone() for p in params]
    total = float(torch.norm(torch.stack([g.norm() for g in reference])))
    torch.nn.utils.clip_grad_norm_([torch.nn.Parameter(g.clone()) for g in reference], 0.5)  # torch's clipping
    expected = [g * (0.5 / (total + 1e-6)) for g in reference]
    clip_grad_by_total_norm_cpu(params, 0.5, total)
    assert all(torch.allclose(p.grad, e, rtol=1e-6) for p, e in zip(params, expected))
    clip_grad_by_total_norm_cpu(params, 100.0, total)  # below the threshold: untouched
    assert all(torch.allclose(p.grad, e, rtol=1e-6) for p, e in zip(params, expected))


# --- model recipes ---------------------------------------------------------------------------


def test_llama_recipes_have_the_published_parameter_counts_and_parallelism():
    from recipes.models import RECIPES, get_model_recipe

    # parameter counts of meta-llama/Llama-3.2-1B, Meta-Llama-3-8B, Meta-Llama-3-70B
    published = {"llama3_1b": 1_235_814_400, "llama3_8b": 8_030_261_248, "llama3_70b": 70_553_706_496}
    for name, count in published.items():
        assert get_model_recipe(name).num_params() == count, name
    assert {n: RECIPES[n]().parallelism.data for n in published} == {"llama3_1b": 8, "llama3_8b": 4, "llama3_70b": 2}
    big = get_model_recipe("llama3_70b").parallelism
    assert (big.tensor, big.pipeline, big.virtual_pipeline, big.context, big.sequence_parallel) == (4, 4, 5, 2, True)
    assert 25e6 < get_model_recipe("small").num_params() < 35e6


def test_config_overrides_reach_the_recipe():
    from recipes.parallel_plan import stage_recipe

    cfg = PretrainConfig(model="llama3_8b", num_layers=2, hidden_size=256, context_parallel=1, tensor_parallel=2)
    recipe = stage_recipe(cfg)
    assert (recipe.num_layers, recipe.hidden_size, recipe.num_attention_heads) == (2, 256, 32)  # heads: the recipe's
    assert (recipe.parallelism.tensor, recipe.parallelism.context, recipe.parallelism.gpus) == (2, 1, 8)
    with pytest.raises(ValueError, match="divide evenly"):
        stage_recipe(PretrainConfig(model="small", num_query_groups=3))


# --- HF export -------------------------------------------------------------------------------


def test_hf_export_gives_the_megatron_logits_in_transformers(tmp_path, tokenized):
    from transformers import AutoTokenizer, LlamaForCausalLM

    from recipes.hf_export import export_llama, megatron_tensors
    from recipes.megatron_model import build_gpt_model
    from recipes.pretrain_data import causal_mask

    tokenizer = AutoTokenizer.from_pretrained(tokenized / "tokenizer")
    model = randomize(build_gpt_model(micro(), len(tokenizer), seed=0)).eval()
    export_llama(megatron_tensors(model), micro(), tokenized / "tokenizer", 64, tmp_path / "hf")

    hf = LlamaForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    assert hf.config.vocab_size == len(tokenizer) == VOCAB
    assert model.output_layer.weight.shape[0] == 512
    assert hf.config.num_key_value_heads == 2 and hf.config.num_attention_heads == 4
    tokens = torch.randint(0, VOCAB, (2, 64), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        mcore = model(tokens, None, causal_mask(64))[..., :VOCAB]
        theirs = hf(input_ids=tokens).logits
    assert mcore.std() > 1.0  # large logits: a wrong mapping could not hide in rounding
    assert (mcore - theirs).abs().max().item() <= 1e-4
    for f in (tokenized / "tokenizer").iterdir():  # the tokenizer travels byte for byte
        assert (tmp_path / "hf" / f.name).read_bytes() == f.read_bytes()


def test_hf_to_megatron_to_hf_round_trip_is_exact(tokenized):
    from transformers import AutoTokenizer, LlamaForCausalLM

    from recipes.hf_export import hf_to_megatron, llama_config, megatron_tensors, megatron_to_hf
    from recipes.megatron_model import build_gpt_model
    from recipes.pretrain_data import causal_mask

    tokenizer = AutoTokenizer.from_pretrained(tokenized / "tokenizer")
    torch.manual_seed(3)
    hf = randomize(LlamaForCausalLM(llama_config(micro(), len(tokenizer), 64)), seed=3).eval()
    hf_state = hf.state_dict()

    model = build_gpt_model(micro(), VOCAB, seed=0).eval()
    mcore_state = hf_to_megatron(hf_state, micro(), 512)
    assert set(mcore_state) == set(megatron_tensors(model))
    model.load_state_dict(mcore_state, strict=False)
    assert (mcore_state["output_layer.weight"][VOCAB:] == 0).all()

    back = megatron_to_hf(megatron_tensors(model), micro(), VOCAB)
    assert set(back) == set(hf_state)
    mismatches = [k for k in hf_state if not torch.equal(back[k], hf_state[k])]
    assert mismatches == []
    tokens = torch.randint(0, VOCAB, (1, 48), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        diff = (model(tokens, None, causal_mask(48))[..., :VOCAB] - hf(input_ids=tokens).logits).abs().max()
    assert diff.item() <= 1e-4


def test_tied_embeddings_and_llama3_rope_scaling_export_with_equal_logits(tmp_path, tokenized):
    from transformers import LlamaForCausalLM

    from recipes.hf_export import export_llama, hf_to_megatron, megatron_tensors
    from recipes.megatron_model import build_gpt_model
    from recipes.models import get_model_recipe
    from recipes.pretrain_data import causal_mask

    # Llama-3.2-1B's choices on the micro shape: tied embeddings, RoPE base 500k scaled x32
    recipe = get_model_recipe("micro", tie_embeddings=True, rotary_base=500000.0, rope_scaling_factor=32.0)
    model = randomize(build_gpt_model(recipe, VOCAB, seed=0)).eval()
    assert model.output_layer.weight is None  # megatron reads the embedding
    export_llama(megatron_tensors(model), recipe, tokenized / "tokenizer", 64, tmp_path / "hf")
    hf = LlamaForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    assert hf.config.tie_word_embeddings and hf.config.rope_parameters["rope_type"] == "llama3"
    tokens = torch.randint(0, VOCAB, (2, 64), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        diff = (model(tokens, None, causal_mask(64))[..., :VOCAB] - hf(input_ids=tokens).logits).abs().max()
        default_rope = {"rope_type": "default", "rope_theta": 500000.0}
        unscaled = LlamaForCausalLM.from_pretrained(tmp_path / "hf", rope_parameters=default_rope).eval()
        scaling_effect = (unscaled(input_ids=tokens).logits - hf(input_ids=tokens).logits).abs().max()
    assert diff.item() <= 1e-4 < scaling_effect.item()  # the scaling matters, and both apply it alike
    back, ours = hf_to_megatron(hf.state_dict(), recipe, 512), megatron_tensors(model)
    assert set(back) == set(ours)
    ours["embedding.word_embeddings.weight"][VOCAB:] = 0  # padding rows: not exported, zero on import
    assert [k for k in ours if not torch.equal(back[k], ours[k])] == []


# --- data ------------------------------------------------------------------------------------


def test_gpt_dataset_samples_are_windows_of_our_documents(tmp_path, tokenized):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from recipes.pretrain_data import build_gpt_datasets

    data, seq = tokenized / "data", 64
    train, valid = build_gpt_datasets(data, tokenized / "tokenizer", seq, 3000, 1234, tmp_path / "cache")
    peer = IndexedDataset(str(data / "train"))
    lengths = peer.sequence_lengths
    assert all(peer[i][-1] == 1 for i in range(len(peer)))  # every document ends in </s>
    epoch_tokens = int(lengths.sum())
    assert len(train) >= 3000 > (epoch_tokens - 1) // seq  # more than one epoch was built

    # sample j = the seq+1 tokens starting at (document, offset) of the document stream
    stream = np.concatenate([peer[int(d)] for d in train.document_index])
    starts = np.concatenate([[0], np.cumsum(lengths[train.document_index])])
    for j in (0, 1, 777, len(train) - 1):
        doc_pos, offset = train.sample_index[train.shuffle_index[j]]
        begin = starts[doc_pos] + offset
        window = torch.from_numpy(stream[begin : begin + seq + 1].astype(np.int64))
        sample = train[j]
        assert torch.equal(sample["tokens"], window[:-1]) and torch.equal(sample["labels"], window[1:])
        assert sample["loss_mask"].sum() == seq
    assert len(valid) == (int(IndexedDataset(str(data / "valid")).sequence_lengths.sum()) - 1) // seq
    assert list((tmp_path / "cache").glob("*shuffle_index.npy"))  # index caches went where we said


def test_unigram_baseline_is_the_cross_entropy_of_token_frequencies(tokenized):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from recipes.pretrain_data import unigram_loss

    peer = IndexedDataset(str(tokenized / "data" / "train"))
    counts = np.bincount(np.concatenate([peer[i] for i in range(len(peer))]), minlength=VOCAB) + 1.0
    labels = torch.tensor([[1, 5, 5, 300]])
    expected = -np.mean(np.log(counts[[1, 5, 5]] / counts.sum()))  # the last label is masked out
    loss = unigram_loss(tokenized / "data", VOCAB, labels, torch.tensor([[1.0, 1.0, 1.0, 0.0]]))
    assert loss == pytest.approx(expected, rel=1e-9)


def write_constant_dataset(prefix: Path, token: int, n_docs: int) -> str:
    """Write an indexed dataset of `n_docs` documents of `token` repeated, each closed by </s> (id 1)."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    builder = IndexedDatasetBuilder(str(prefix) + ".bin", dtype=np.uint16)
    for i in range(n_docs):
        ids = [token] * (20 + i % 30) + [1]
        builder.add_document(np.asarray(ids), [len(ids)])
    builder.finalize(str(prefix) + ".idx")
    return str(prefix)


def test_blended_data_follows_the_weights_in_a_deterministic_order(tmp_path, tokenized):
    from recipes.megatron_model import init_model_parallel
    from recipes.pretrain_data import build_gpt_datasets, train_blend

    init_model_parallel(seed=0)

    sevens = write_constant_dataset(tmp_path / "sevens", 7, 300)
    nines = write_constant_dataset(tmp_path / "nines", 9, 300)
    blend = train_blend(tokenized / "data", ("tokenize", sevens, nines), (5.0, 3.0, 2.0))
    weights = np.array([0.5, 0.3, 0.2])
    n = 1000

    def build(cache: str):
        return build_gpt_datasets(tokenized / "data", tokenized / "tokenizer", 64, n, 7, tmp_path / cache, blend)[0]

    train = build("a")
    assert len(train) >= n
    # after every prefix of the sample order, each dataset has supplied its share to within one sample
    counts = np.stack([np.cumsum(train.dataset_index[:n] == k) for k in range(3)], axis=1)  # [n, 3]
    expected = np.arange(1, n + 1)[:, None] * weights
    assert np.abs(counts - expected).max() <= 1.0
    # each sample really comes from the dataset the index names (a peer check on its tokens)
    for j in range(0, n, 7):
        tokens = set(train[j]["tokens"].tolist()) | set(train[j]["labels"].tolist())
        source = {7: 1, 9: 2}.get(min(tokens - {1}), 0) if tokens <= {1, 7, 9} else 0
        assert source == train.dataset_index[j], j
    # deterministic: rebuilt from scratch (another cache), the same order and the same tokens
    again = build("b")
    assert np.array_equal(again.dataset_index[:n], train.dataset_index[:n])
    assert all(torch.equal(again[j]["tokens"], train[j]["tokens"]) for j in (0, 1, 500, n - 1))
    with pytest.raises(ValueError, match="one positive weight per data prefix"):
        train_blend(tokenized / "data", ("tokenize", sevens), (1.0,))


# --- training --------------------------------------------------------------------------------


def one_process_trainer(cfg: PretrainConfig):
    """Return (chunks, optimizer, world) of the micro model on one process, from megatron's machinery."""
    from recipes.megatron_model import init_parallel
    from recipes.pretrain_loop import build_model_chunks, make_optimizer

    world = init_parallel(micro().parallelism, seed=0)
    chunks = build_model_chunks(micro(), VOCAB, seed=0, seq_length=64)
    return chunks, make_optimizer(chunks, cfg), world


def test_training_reduces_validation_loss(tmp_path, tokenized):
    from recipes.pretrain import lr_at
    from recipes.pretrain_data import batch, build_gpt_datasets
    from recipes.pretrain_loop import run_schedule, train

    cfg = PretrainConfig(model="micro", max_steps=40, eval_every=40, checkpoint_every=40, micro_batch_size=4)
    train_ds, valid_ds = build_gpt_datasets(tokenized / "data", tokenized / "tokenizer", 64, 160, 1, tmp_path / "c")
    valid_batches = [batch(valid_ds, range(0, 4)), batch(valid_ds, range(4, 8))]
    chunks, optimizer, world = one_process_trainer(cfg)
    with torch.no_grad():
        before = run_schedule(chunks, valid_batches, 64, forward_only=True)
    state = train(chunks, optimizer, train_ds, valid_batches, cfg, 64, world, lr_at, tmp_path / "checkpoint", {})
    assert state["step"] == 40 and state["consumed_samples"] == 160 and [s for s, _ in state["val"]] == [40]
    assert state["val"][0][1] < before - 0.5
    assert (tmp_path / "checkpoint" / "step_0000040" / "index.json").is_file()


def test_checkpoint_restores_weights_and_optimizer_and_only_complete_ones_are_seen(tmp_path):
    from recipes import dist_checkpoint
    from recipes.pretrain_loop import train_step

    cfg = PretrainConfig(model="micro")
    chunks, optimizer, _ = one_process_trainer(cfg)
    tokens = torch.randint(0, VOCAB, (2, 65), generator=torch.Generator().manual_seed(0))
    data = [{"tokens": tokens[:, :-1], "labels": tokens[:, 1:], "loss_mask": torch.ones(2, 64)}]
    train_step(chunks, optimizer, data, 64, lr=1e-3)
    root = tmp_path / "checkpoint"
    for step in (1, 2, 3):
        dist_checkpoint.save(root, [c.module for c in chunks], optimizer, {"step": step, "train": []}, keep=2)
    assert [p.name for p in dist_checkpoint.checkpoints(root)] == ["step_0000002", "step_0000003"]
    (root / "step_0000004.tmp").mkdir()  # a save cut short by a kill: never a candidate
    assert dist_checkpoint.latest(root) == root / "step_0000003"
    assert dist_checkpoint.load(root / "step_0000003", [chunks[0].module], None)["step"] == 3

    fresh_chunks, fresh_optimizer, _ = one_process_trainer(cfg)
    with torch.no_grad():
        for p in fresh_chunks[0].module.parameters():
            p.add_(1.0)
    assert dist_checkpoint.load(root / "step_0000003", [fresh_chunks[0].module], fresh_optimizer)["step"] == 3
    states = lambda opt: {id(p): opt.optimizer.state[p] for p in opt.optimizer.state}  # noqa: E731
    old, new = states(optimizer), states(fresh_optimizer)
    for (name, a), b in zip(chunks[0].module.named_parameters(), fresh_chunks[0].module.parameters()):
        assert torch.equal(a, b), name
        assert all(torch.equal(old[id(a)][k], new[id(b)][k]) for k in ("exp_avg", "exp_avg_sq")), name
        assert float(new[id(b)]["step"]) == 3.0
    tensors = dist_checkpoint.full_model_tensors(root / "step_0000003")
    assert sum(t.numel() for t in tensors.values()) == micro().num_params(512)


def test_lr_schedule_warms_up_then_decays_to_min_lr():
    from recipes.pretrain import lr_at

    cfg = PretrainConfig(max_steps=100, warmup_steps=10, lr=1e-3, min_lr=1e-4)
    lrs = [lr_at(s, cfg) for s in range(100)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[4] == pytest.approx(5e-4) and lrs[9] == pytest.approx(1e-3)
    assert lrs[10] == pytest.approx(1e-3)  # cosine from the peak: progress 0 after warmup
    assert lrs[55] == pytest.approx(1e-4 + 0.5 * 9e-4)  # half way through the decay: the midpoint
    assert lrs[40] == pytest.approx(1e-4 + 0.5 * 9e-4 * (1 + math.cos(math.pi / 3)))
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))
    assert lrs[-1] == pytest.approx(1e-4, rel=1e-2)


def test_gradient_accumulation_gives_the_step_of_the_whole_batch(tmp_path, tokenized):
    from recipes.pretrain_data import batch, build_gpt_datasets
    from recipes.pretrain_loop import train_step

    train_ds, _ = build_gpt_datasets(tokenized / "data", tokenized / "tokenizer", 64, 8, 1, tmp_path / "c")
    cfg = PretrainConfig(model="micro")
    results = []
    for mbs, accum in ((4, 1), (2, 2), (1, 4)):
        chunks, optimizer, _ = one_process_trainer(cfg)
        micro_batches = [batch(train_ds, range(i * mbs, (i + 1) * mbs)) for i in range(accum)]
        loss, grad_norm = train_step(chunks, optimizer, micro_batches, 64, lr=0.0)
        results.append((loss, grad_norm, torch.cat([p.main_grad.flatten() for p in chunks[0].parameters()])))
    for loss, grad_norm, grads in results[1:]:
        assert loss == pytest.approx(results[0][0], abs=1e-6) and grad_norm == pytest.approx(results[0][1], rel=1e-5)
        assert (grads - results[0][2]).abs().max() <= 1e-5 * results[0][2].abs().max()  # the (clipped) gradient


# --- generation ------------------------------------------------------------------------------


def test_top_k_and_top_p_keep_the_tokens_they_should():
    from recipes.generate import filter_logits

    logits = torch.log(torch.tensor([[0.5, 0.25, 0.15, 0.1], [0.1, 0.15, 0.25, 0.5]]))
    kept = lambda out: torch.isfinite(out).tolist()  # noqa: E731
    assert kept(filter_logits(logits, 1.0, top_k=2)) == [[True, True, False, False], [False, False, True, True]]
    # nucleus 0.7: 0.5 alone is short of it, 0.5 + 0.25 reaches it; the rest drop
    assert kept(filter_logits(logits, 1.0, top_p=0.7)) == [[True, True, False, False], [False, False, True, True]]
    assert kept(filter_logits(logits, 1.0, top_p=0.01))[0] == [True, False, False, False]  # the top token stays
    assert torch.allclose(filter_logits(logits, 0.5), logits * 2)


def test_kv_cache_generation_equals_full_recompute_for_megatron_and_hf(tokenized):
    from transformers import LlamaForCausalLM

    from recipes.generate import generate, hf_next_logits, megatron_next_logits
    from recipes.hf_export import llama_config, megatron_tensors, megatron_to_hf
    from recipes.megatron_model import build_gpt_model

    model = randomize(build_gpt_model(micro(), VOCAB, seed=0))
    hf = LlamaForCausalLM(llama_config(micro(), VOCAB, 64))
    hf.load_state_dict(megatron_to_hf(megatron_tensors(model), micro(), VOCAB))
    prompt = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(4))
    decoders = {
        "megatron, KV cache": megatron_next_logits(model, VOCAB, 64),
        "megatron, no cache": megatron_next_logits(model, VOCAB, 64, use_cache=False),
        "HF, KV cache": hf_next_logits(hf),
        "HF, no cache": hf_next_logits(hf, use_cache=False),
    }
    greedy = {name: generate(d, prompt, 40) for name, d in decoders.items()}
    sampling = dict(temperature=0.9, top_k=100, top_p=0.9, seed=5)
    sampled = {name: generate(d, prompt, 40, **sampling) for name, d in decoders.items()}
    reference = greedy["megatron, no cache"]
    assert reference.shape == (2, 49) and torch.equal(reference[:, :9], prompt)
    assert all(torch.equal(out, reference) for out in greedy.values())
    assert all(torch.equal(out, sampled["megatron, no cache"]) for out in sampled.values())
    assert not torch.equal(sampled["HF, KV cache"], reference)  # sampling did sample
    assert len(set(reference[0, 9:].tolist())) > 5  # large random weights: a varied sequence, not one token


def test_generation_stops_rows_at_eos():
    from recipes.generate import generate

    def next_logits(ids, cache):  # row 0 says eos (id 1) at its third token, row 1 never
        logits = torch.zeros(ids.shape[0], 5)
        logits[0, 1 if ids.shape[1] >= 4 else 3] = 1.0
        logits[1, 2] = 1.0
        return logits, cache

    out = generate(next_logits, torch.zeros(2, 2, dtype=torch.long), 6, eos_token_id=1)
    assert out[0, 2:].tolist() == [3, 3, 1, 1, 1, 1] and out[1, 2:].tolist() == [2] * 6


# --- the stage -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory, tokenized) -> tuple[Path, dict]:
    """Run the pretrain stage of the smoke preset through the runner; return (run_dir, manifest)."""
    configs = resolve_configs("smoke")
    run_dir = layout_run_dir(tmp_path_factory.mktemp("smoke") / "run", tokenized, configs)
    return run_dir, execute_stage(str(run_dir), "pretrain", configs_to_json(configs))


def test_stage_through_the_runner_exports_a_working_hf_llama(smoke_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run_dir, manifest = smoke_run
    assert manifest["status"] == "completed"
    m = manifest["metrics"]
    assert m["steps"] == 20 and m["hf_logits_max_abs_diff"] <= 1e-4
    assert m["val_loss"] < math.log(VOCAB) - 0.3 and m["val_ppl"] == pytest.approx(math.exp(m["val_loss"]), rel=1e-3)
    out = run_dir / "pretrain"
    assert (out / manifest["outputs"]["loss_curve"]["path"]).read_bytes()[:4] == b"\x89PNG"
    hf_dir = out / manifest["outputs"]["hf"]["path"]
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    ids = tokenizer("The import statement", return_tensors="pt")["input_ids"]
    generated = model.generate(ids, max_new_tokens=5, do_sample=False)
    assert generated.shape[1] == ids.shape[1] + 5
    assert not (run_dir / "pretrain.tmp").exists()


def test_stage_writes_tensorboard_scalars(smoke_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir, manifest = smoke_run
    events = EventAccumulator(str(run_dir / "pretrain" / manifest["outputs"]["tensorboard"]["path"])).Reload()
    assert {"train/loss", "train/lr", "train/grad_norm", "train/tokens_per_s", "val/loss", "val/ppl"} <= set(
        events.Tags()["scalars"]
    )
    assert [e.step for e in events.Scalars("train/loss")] == list(range(1, 21))
    val = events.Scalars("val/loss")
    assert [e.step for e in val] == [10, 20]
    assert val[-1].value == pytest.approx(manifest["metrics"]["val_loss"], abs=1e-4)


def test_evaluate_checkpoint_scores_and_continues_an_hf_checkpoint(smoke_run, tmp_path):
    from recipes.eval_checkpoint import evaluate_checkpoint

    run_dir, _ = smoke_run
    heldout = tmp_path / "heldout.jsonl"
    heldout.write_text("".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in enumerate(doc_texts()[-6:])))
    report = evaluate_checkpoint(run_dir / "pretrain" / "hf", heldout, ("The import statement",), max_new_tokens=6)
    assert report["tokens"] > 100 and report["perplexity"] == pytest.approx(math.exp(report["nll"]))
    assert report["perplexity"] < VOCAB  # trained: better than uniform over the vocabulary
    (sample,) = report["samples"]
    assert sample["prompt"] == "The import statement" and sample["greedy"] and sample["sampled"]
    assert report["lm_eval"] == {}

    from recipes.eval_checkpoint import InputError

    tasks = ("aigc_heldout", "aigc_heldout_cloze", "aigc_heldout_instructions")  # shipped in recipes/lm_eval_tasks
    harness = evaluate_checkpoint(run_dir / "pretrain" / "hf", heldout, (), lm_eval_tasks=tasks)["lm_eval"]
    assert set(harness) == set(tasks)
    assert set(harness["aigc_heldout"]) >= {"word_perplexity", "byte_perplexity", "bits_per_byte"}
    assert 0 < harness["aigc_heldout"]["bits_per_byte"] < 16 and harness["aigc_heldout"]["documents"] == 6
    assert harness["aigc_heldout_cloze"]["items"] > 0 and 0 <= harness["aigc_heldout_cloze"]["acc_norm"] <= 1
    assert harness["aigc_heldout_instructions"]["items"] > 0 and harness["aigc_heldout_instructions"]["exact_match"] >= 0
    with pytest.raises(InputError, match="lm-eval tasks no_such_task") as failure:
        evaluate_checkpoint(run_dir / "pretrain" / "hf", heldout, (), lm_eval_tasks=("no_such_task",))
    assert "\n" not in str(failure.value)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the GPU path needs CUDA")
def test_gpu_path_trains_with_megatron_ddp_on_the_same_loop(tmp_path, tokenized):
    configs = resolve_configs("smoke", ["pretrain.max_steps=40", "pretrain.grad_accum_steps=2"])
    run_dir = layout_run_dir(tmp_path / "run", tokenized, configs)
    manifest = execute_stage(str(run_dir), "pretrain", configs_to_json(configs))

    m = manifest["metrics"]
    assert manifest["status"] == "completed" and m["steps"] == 40 and m["train_tokens"] == 40 * 2 * 8 * 64
    assert m["val_loss"] < math.log(VOCAB) - 0.5 and m["hf_logits_max_abs_diff"] <= 1e-4


@pytest.mark.slow
def test_killed_stage_resumes_and_ends_where_an_uninterrupted_run_ends(tmp_path, tokenized):
    steps = 200
    configs = resolve_configs(
        "smoke", [f"pretrain.max_steps={steps}", "pretrain.checkpoint_every=10", "pretrain.eval_every=50"]
    )
    configs_json = configs_to_json(configs)
    whole = layout_run_dir(tmp_path / "whole", tokenized, configs)
    killed = layout_run_dir(tmp_path / "killed", tokenized, configs)

    code = "import sys; from pipeline.runner import execute_stage; execute_stage(sys.argv[1], 'pretrain', sys.argv[2])"
    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(killed), configs_json],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    from recipes import dist_checkpoint

    def checkpointed_step() -> int:
        found = dist_checkpoint.latest(killed / "pretrain.tmp" / "checkpoint")
        return json.loads((found / "train_state.json").read_text())["step"] if found else 0

    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and checkpointed_step() < 30:
        time.sleep(0.05)
    assert proc.poll() is None, "the stage finished (or died) before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (killed / "pretrain").exists()

    resumed = execute_stage(str(killed), "pretrain", configs_json)
    reference = execute_stage(str(whole), "pretrain", configs_json)

    assert resumed["resumed"] and 30 <= resumed["metrics"]["resumed_from_step"] < steps
    for key in ("steps", "train_loss", "val_loss", "hf_logits_max_abs_diff"):
        assert resumed["metrics"][key] == reference["metrics"][key], key
    finals = [dist_checkpoint.latest(d / "pretrain" / "checkpoint") for d in (killed, whole)]
    a, b = (dist_checkpoint.full_model_tensors(f) for f in finals)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    history = [json.loads((f / "train_state.json").read_text()) for f in finals]
    assert history[0]["train"] == history[1]["train"] and history[0]["val"] == history[1]["val"]
    assert resumed["outputs"]["hf"]["sha256"] == reference["outputs"]["hf"]["sha256"]
