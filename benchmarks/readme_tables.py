"""Render the README's benchmark figures from the committed results files, or check that they match.

The README marks each rendered block:

    <!-- results: NAME -->
    ...generated from benchmarks/results/NAME.json (and its siblings) ...
    <!-- /results: NAME -->

`python benchmarks/readme_tables.py` rewrites every block from the results files;
`--check` changes nothing and exits 1 naming each block that differs (the test
suite runs it). A block names the command that produced its figures, the date
and the machine, then the table; prose outside the blocks carries no figures.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
README = ROOT / "README.md"
BLOCK = re.compile(r"(<!-- results: (?P<name>[\w-]+) -->\n)(?P<body>.*?)(<!-- /results: (?P=name) -->)", re.S)


def load(name: str) -> dict:
    """Return the results document benchmarks/results/<name>.json."""
    return json.loads((RESULTS / f"{name}.json").read_text(encoding="utf-8"))


def table(header: list[str], rows: list[list]) -> str:
    """Return a markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def provenance(*docs: dict) -> str:
    """Return the line naming the command(s), date and machine of results documents."""
    parts = []
    for doc in docs:
        m = doc["machine"]
        where = f"{m['cpus']} CPUs" + (f", {m['gpu']}" if "gpu" in m else "") + f", load average {m['load_average_1m']}"
        at = f", commit {doc['commit']}" if doc.get("commit") else ""
        parts.append(f"`{doc['command']}` ({doc['date']}{at}; {where} at the end)")
    return "; ".join(parts) + ":"


def n(value: float, digits: int = 0) -> str:
    """Return the number with thousands separators and `digits` decimals."""
    return f"{value:,.{digits}f}"


def chain(doc: dict) -> str:
    f = doc["figures"]
    stages = f["stages"]
    key = {  # stage -> [(metric, label, digits)] shown
        "curate": [("input_lines", "records in", 0), ("docs_out", "documents out", 0)],
        "tokenize": [("train_docs", "train documents", 0), ("valid_docs", "held-out", 0),
                     ("train_docs_dropped_overlap", "dropped for a 13-gram shared with held-out", 0)],
        "pretrain": [("val_loss", "held-out loss", 3), ("unigram_val_loss", "unigram baseline", 3)],
        "sft": [("val_loss_before", "held-out instruction loss before", 3), ("val_loss_after", "after", 3)],
        "align": [("rm_val_accuracy", "reward model held-out accuracy", 2), ("win_rate_vs_sft", "win rate vs SFT", 2)],
        "evaluate": [("prompt_items", "prompting items", 0), ("heldout_chats", "held-out chats", 0)],
        "export": [("parameters", "parameters", 0)],
        "serve": [("start_to_ready_s", "Triton start to ready s", 1)],
    }
    rows = []
    for name in [s for s in key if s in stages] + [s for s in stages if s not in key]:
        m = stages[name]["metrics"]
        shown = [f"{label} {n(m[k], d)}" for k, label, d in key.get(name, []) if k in m]
        rows.append([f"`{name}`", f"{stages[name]['wall_s']:.1f}", ", ".join(shown)])
    ev = stages.get("evaluate", {}).get("metrics", {})
    columns = [("ppl", "held-out perplexity", 1), ("instr_ppl", "held-out instruction perplexity", 1),
               ("acc_zero_shot", "prompting acc zero-shot", 3), ("lmeval_bits_per_byte", "lm-eval bits/byte", 3),
               ("lmeval_cloze_acc_norm", "lm-eval cloze acc_norm", 3),
               ("lmeval_instructions_exact_match", "lm-eval instructions exact match", 3)]
    models = [m for m in ("pretrain", "sft", "align") if f"{m}_ppl" in ev]
    evaluation = table(["checkpoint", *(label for _, label, _ in columns)],
                       [[m, *(n(ev[f"{m}_{k}"], d) if f"{m}_{k}" in ev else "–" for k, _, d in columns)]
                        for m in models])
    answer = f["answer"]
    prompt = answer["prompt"].replace("\n", "\\n")
    return "\n".join([
        provenance(doc), "",
        table(["stage", "wall s", "figures"], rows), "",
        "`evaluate`, per checkpoint, on the held-out split (lm-eval: the three tasks of `recipes/lm_eval_tasks`):", "",
        evaluation, "",
        f"Whole chain (`{f['config']}`, {'cold' if f['cold'] else 'warm'}): {f['wall_s']:.0f} s wall, peak RSS "
        f"{f['peak_rss_gib']} GiB; the immediate re-run, every stage cached: {f['cached_wall_s']:.1f} s. "
        f"Triton's answer to `{prompt}`: `{answer['answer']}`",
    ])


def openai_load(doc: dict) -> str:
    f = doc["figures"]
    clients = f["args"]["concurrency"]
    rows = []
    for label in ("1 client", f"{clients} clients"):
        r = f[f"{label} / all"]
        rows.append([label.split()[0], r["requests"], r["errors"], f"{r['tokens_per_s']:.0f} ({r['ratio_to_one_client']:.2f}×)",
                     f"{r['p50_ms']:.0f} / {r['p99_ms']:.0f} ms", f"{r['first_p50_ms']:.0f} / {r['first_p99_ms']:.0f} ms"])
    return "\n".join([
        provenance(doc), "",
        table(["clients", "requests", "errors", "output tokens/s (× 1 client)", "latency p50 / p99",
               "first event p50 / p99 (streams)"], rows), "",
        f"Every answer equal to the one-client run's: {f['same_text_as_baseline']}; server start to ready "
        f"{f['start_to_ready_s']} s.",
    ])


def triton_latency(pytorch: dict, onnx: dict) -> str:
    rows = []
    for backend, doc in (("pytorch", pytorch), ("onnx", onnx)):
        modes = {m["mode"]: m for m in doc["figures"]["modes"]}
        for c in doc["figures"]["args"]["concurrency"].split(","):
            stream, whole = modes[f"Triton c={c} stream"], modes[f"Triton c={c} whole"]
            rows.append([backend, c, f"{stream['tokens_per_s']:.0f} ({stream['ratio_to_baseline']:.2f}×)",
                         f"{stream['first_token']['p50_ms']:.1f} ms",
                         f"{whole['tokens_per_s']:.0f} ({whole['ratio_to_baseline']:.2f}×)",
                         str(all(m["same_text_as_baseline"] for m in (stream, whole)))])
    base = {b: {m["mode"]: m for m in d["figures"]["modes"]}["generate() sequential"]["tokens_per_s"]
            for b, d in (("pytorch", pytorch), ("onnx", onnx))}
    ident = pytorch["figures"]["identity"]
    return "\n".join([
        provenance(pytorch, onnx), "",
        table(["backend", "clients", "streamed tokens/s (× generate)", "first-token p50",
               "whole-answer tokens/s (× generate)", "same text as generate"], rows), "",
        f"Sequential `generate()` baseline: {base['pytorch']:.0f} tokens/s (pytorch run), {base['onnx']:.0f} "
        f"(onnx run). Triton's own cost per request (identity python model): p50 {ident['http']['p50_ms']} ms over "
        f"HTTP, {ident['grpc']['p50_ms']} ms over gRPC. Start-to-ready: {ident['start_to_ready_s']:.1f} s for the "
        f"identity model, {pytorch['figures']['start_to_ready_s']:.1f} s (pytorch) and "
        f"{onnx['figures']['start_to_ready_s']:.1f} s (onnx) for the LLM repository.",
    ])


def serving_engines(doc: dict) -> str:
    f = doc["figures"]
    base = f["baseline"]
    rows = [["`generate()` sequential", "1", f"{base['tokens_per_s']:.0f} (1.00×)",
             f"{base['first_token']['p50_ms']:.1f} / {base['first_token']['p99_ms']:.1f} ms", "-"]]
    for engine, result in f["engines"].items():
        for c, r in result["by_clients"].items():
            first = r["first_token"]
            rows.append([engine, c, f"{r['tokens_per_s']:.0f} ({r['tokens_per_s'] / base['tokens_per_s']:.2f}×)",
                         f"{first['p50_ms']:.1f} / {first['p99_ms']:.1f} ms", str(r["same_text_as_baseline"])])
    ready = ", ".join(f"{e} {r['start_to_ready_s']:.0f} s" for e, r in f["engines"].items())
    return "\n".join([
        provenance(doc), "",
        table(["engine", "clients", "streamed tokens/s (× generate)", "first token p50 / p99",
               "same text as generate"], rows), "",
        f"Model: {f['model']}, greedy, {f['max_tokens']} new tokens, {f['threads']} thread per engine. Fastest "
        f"(tokens/s summed over the client counts): {f['fastest']}. Start to ready: {ready}.",
    ])


def sft_lora(doc: dict) -> str:
    f = doc["figures"]
    rows = []
    for name, r in f["results"].items():
        rows.append([name, f"{r['val_loss']:.4f}", f"{r['zero_shot']:.3f} / {r['few_shot']:.3f}",
                     f"{r['fraction']:.4f}" if r["fraction"] else "–",
                     f"{r['step_ratio']:.2f}" if "step_ratio" in r else "–"])
    return "\n".join([
        provenance(doc), "",
        f"{f['steps']} steps of {f['batch']} chats; {f['heldout_chats']} held-out chats; prompting accuracy over "
        f"{f['items']} items (chance {f['chance']:.2f}).", "",
        table(["model", "held-out instruction loss", "accuracy zero-/few-shot", "trainable fraction",
               "step time / full SFT"], rows),
    ])


def alignment_methods(doc: dict) -> str:
    methods = doc["figures"]["methods"]
    first = next(iter(methods.values()))
    rows = [[m, f"{r['judge_score_sft']:.2f} → {r['judge_score_aligned']:.2f}", f"{r['win_rate_vs_sft']:.2f}",
             f"{r['kl_from_reference']:.2f}", f"{r['train_time_s']:.0f}"] for m, r in methods.items()]
    lines = [provenance(doc), "",
             f"{first['judge_prompts']} held-out prompts judged by the reward model (held-out pairwise accuracy "
             f"{first['rm_val_accuracy']:.2f}); sampled answers.", "",
             table(["method", "reward-model score SFT → aligned", "win rate vs SFT", "KL from reference (nats/answer)",
                    "train s"], rows)]
    if "steerlm" in methods and "steer_words_by_verbosity" in methods["steerlm"]:
        words = ", ".join(f"{w:.1f}" for w in methods["steerlm"]["steer_words_by_verbosity"])
        lines += ["", f"SteerLM, requested verbosity 0…4 → answers of {words} words."]
    return "\n".join(lines)


def _layout_table(layouts: dict, base_name: str, columns: list[tuple[str, str, int]]) -> list[list]:
    """Rows of (layout, per (label, metric path, digits): value and ratio to `base_name` for tokens/s)."""
    rows = []
    for name, m in layouts.items():
        row = [name]
        for stage, metric, digits in columns:
            value = m[stage][metric] if stage else m[metric]
            if metric == "tokens_per_s":
                base = layouts[base_name][stage][metric] if stage else layouts[base_name][metric]
                row += [n(value), f"{value / base:.2f}×"]
            else:
                row.append(f"{value:.{digits}f}")
        rows.append(row)
    return rows


def multirank_pretrain(doc: dict) -> str:
    f = doc["figures"]
    layouts = f["layouts"]
    first = next(iter(layouts.values()))
    rows = _layout_table(layouts, "1 rank x 2 threads", [("", "tokens_per_s", 0), ("", "val_loss", 4)])
    seq = first["train_tokens"] // (f["steps"] * f["global_batch"])
    return "\n".join([
        provenance(doc), "",
        f"Model `{f['config']}` ({n(first['params'])} parameters), {f['steps']} steps of a global batch of "
        f"{f['global_batch']} × {seq} tokens.", "",
        table(["layout", "tokens/s", "× 1 rank × 2 threads", "val loss"], rows),
    ])


def dp_sft_dpo(doc: dict) -> str:
    f = doc["figures"]
    rows = _layout_table(f["layouts"], "1 rank x 2 threads", [("sft", "tokens_per_s", 0), ("sft", "train_loss_end", 4),
                                                              ("align", "tokens_per_s", 0),
                                                              ("align", "train_loss_end", 4)])
    return "\n".join([
        provenance(doc), "",
        table(["layout", "sft tokens/s", "× 1 rank × 2 threads", "sft final loss", "dpo tokens/s",
               "× 1 rank × 2 threads", "dpo final loss"], rows),
    ])


def pretrain_throughput(doc: dict) -> str:
    f = doc["figures"]
    ours, hf = "megatron (our spec, SDPA)", "HF LlamaForCausalLM"
    rows = [[f"{r['seq']} × {r['batch']}", n(r["loops"][ours]["tokens_per_s"]), f"{r['loops'][ours]['mfu']:.1%}",
             n(r["loops"][hf]["tokens_per_s"]), f"{r['loops'][ours]['vs_hf']:.2f}×"] for r in f["rows"]]
    widths = ", ".join(f"hidden {w['hidden']} → {w['step_s']:.2f} s" for w in f["widths"])
    return "\n".join([
        provenance(doc), "",
        f"Model `{f['model']}` ({n(f['params'])} parameters), {f['threads']} thread(s), fastest of {f['steps']} "
        f"steps; MFU against the fp32 matmul peak measured in the same run, {f['peak_gflops']} GFLOP/s.", "",
        table(["seq × batch", "megatron-core GPTModel (ours) tokens/s", "MFU", "HF `LlamaForCausalLM` tokens/s",
               "ours / HF"], rows), "",
        f"Step time against width (ours): {widths}. One AdamW step: "
        + ", ".join(f"{k} {v:.0f} ms" for k, v in f["adamw_ms"].items()) + ".",
    ])


def curate_throughput(doc: dict) -> str:
    f = doc["figures"]
    names = {"aigc": "aigc curate, 2 worker processes (default)", "aigc_ray": "aigc curate on a local Ray (2 CPUs)",
             "plain": "same stages, one process", "datatrove": "datatrove, 2 workers"}
    rows = [[names[k], f[k]["seconds"], n(f[k]["docs_per_s"]), n(f[k]["after_filters"]), n(f[k]["final"]),
             f"{f[k]['dedup_recall']} / {f[k]['dedup_precision']}",
             str(f[k].get("agreement_final", "–")),
             f"{f[k]['peak_gib']} GiB" if f[k]["peak_gib"] is not None else "–"] for k in names if k in f]
    ratios = [f"aigc / {k}: {f['speedup_vs_' + k]}× documents/s" for k in ("aigc_ray", "plain", "datatrove")
              if f"speedup_vs_{k}" in f]
    if "ray_speedup_vs_datatrove" in f:
        ratios.append(f"aigc on Ray / datatrove: {f['ray_speedup_vs_datatrove']}×")
    work = table(["setting", "value", "aigc", "datatrove"], f["work"])
    return "\n".join([
        provenance(doc), "",
        table(["run", "seconds", "docs/s", "docs after filters", "final docs", "fuzzy-dedup recall / precision",
               "final ids vs datatrove's (Jaccard)", "peak memory"], rows), "",
        f"{n(f['docs'])} generated documents. " + "; ".join(ratios) + ".", "",
        "<details><summary>The table both sides are configured from (benchmarks/curation_work.py)</summary>", "",
        work, "", "</details>",
    ])


def curation_quality(doc: dict) -> str:
    f = doc["figures"]
    keys = [("good_retention", "good documents kept"),
            ("near_duplicate_recall", "near duplicates (5-gram Jaccard ≥ 0.75) removed"),
            ("near_duplicate_recall_all", "all planted near copies removed (heavier edits included)"),
            ("exact_duplicate_recall", "exact copies (whitespace / Unicode form) removed"),
            ("junk_removal", "junk removed"), ("pii_recall", "planted personal data redacted"),
            ("pii_false_redactions", "good documents redacted without planted data")]
    rows = [[label, str(f["targets"].get(k, "–")), str(f["default"][k]), str(f["code_aware_off"][k])]
            for k, label in keys]
    d = f["default"]
    kinds = ", ".join(f"{k} {v}" for k, v in d["junk_removal_by_kind"].items())
    return "\n".join([
        provenance(doc), "",
        table(["figure", "target", "default settings", "code_aware=false"], rows), "",
        f"{n(d['documents'])} labelled documents: " + ", ".join(f"{v} {k}" for k, v in d["labels"].items())
        + f". Junk removed by kind (default): {kinds}. Good documents lost (default): {len(d['good_lost'])}.",
    ])


def multimodal_quality(doc: dict) -> str:
    f = doc["figures"]
    t2i, nerf = f["t2i"], f["nerf"]
    rows = [[f"{s['sampler'].upper()} {s['steps']}, guidance {s['guidance']:g}", f"{s['digit_accuracy']:.3f}",
             f"{s['shape_accuracy']:.3f}", f"{s['fid_like']:.1f}", f"{s['sample_s']:.1f}"] for s in t2i["samplers"]]
    curve = "; ".join(f"{p:.1f} dB at {secs:.0f} s" for _, secs, _, p, _ in nerf["curve"])
    return "\n".join([
        provenance(doc), "",
        f"t2i: VAE held-out reconstruction {t2i['vae']['recon_psnr_db']} dB after {t2i['vae']['train_s']:.0f} s; "
        f"UNet ({n(t2i['train']['unet_params'])} parameters) {n(t2i['train']['steps'])} steps in "
        f"{t2i['train']['train_s']:.0f} s; judge accuracy on held-out real images {t2i['judge_real_accuracy']:.3f}; "
        f"FID-like floor between two real sets {t2i['fid_floor']}; {t2i['per_prompt']} images per prompt, "
        f"{t2i['prompts']} prompts.", "",
        table(["sampler", "digit accuracy", "shape accuracy", "FID-like", "sample s"], rows), "",
        f"NeRF held-out PSNR: {curve}; final SSIM {nerf['test_ssim']}; a constant mean-colour image scores "
        f"{nerf['mean_colour_psnr']} dB.",
    ])


def nerf_vs_gsplat(doc: dict) -> str:
    f = doc["figures"]
    names = {"nerf": "NeRF (PE + MLP, hierarchical)", "gsplat": "3D Gaussian splatting"}

    def to_25db(curve: list) -> str:  # rows [step, train s, CPU s, PSNR, SSIM, ...]
        reached = [row for row in curve if row[3] >= 25.0]
        return f"{reached[0][1]:.0f}" if reached else "–"

    rows = [[names[k], f"{r['test_psnr']:.2f}", f"{r['test_ssim']:.3f}", f"{r['train_s']:.0f}",
             f"{r['train_cpu_s']:.0f}", to_25db(r["curve"]), f"{r['render_frames_per_s']:.2f}", f"{n(r['steps'])}",
             f"{n(r['size'])} {r['size_unit']}"] for k, r in f["methods"].items()]
    d = f["densify"]
    return "\n".join([
        provenance(doc), "",
        table(["method", "held-out PSNR dB", "SSIM", "train s", "train CPU s", "train s to 25 dB", "render frames/s",
               "steps", "size"],
              rows), "",
        f"{f['test_views']} held-out views of {f['image_size']}×{f['image_size']} px, {f['train_views']} training "
        f"views, {f['threads']} thread; frames/s timed over {f['passes']} passes in one process after training. "
        f"Densification: {n(d['cloned'])} cloned, {n(d['split'])} split, {n(d['pruned'])} pruned. A constant "
        f"mean-colour image scores {f['mean_colour_psnr']} dB.",
    ])


def zoo(doc: dict) -> str:
    rows = doc["figures"]["recipes"]

    def fmt(value, digits=2):
        return "–" if value is None else f"{value:.{digits}f}"

    def key_figures(r):
        shown = {k: v for k, v in r["key_metrics"].items()
                 if k not in ("test_bits_per_dim", "fid_like", "fid_floor", "train_s") and isinstance(v, (int, float))}
        return ", ".join(f"{k} {v:.3g}" for k, v in shown.items())

    floor = next((r["fid_floor"] for r in rows if r["fid_floor"] is not None), None)
    return "\n".join([
        provenance(doc), "",
        table(["recipe", "family", "test bits/dim", "FID-like", "accuracy (class or domain)", "other figures", "train s", "stage s"],
              [[f"`{r['recipe']}`", r["family"], fmt(r["test_bits_per_dim"]), fmt(r["fid_like"], 1),
                fmt(r["accuracy"], 3), key_figures(r), fmt(r["train_s"], 0), fmt(r["wall_s"], 0)] for r in rows]),
        "",
        f"FID-like floor (two real sets of the same size): {fmt(floor, 1)}.",
    ])


def t2i_steps(doc: dict) -> str:
    f = doc["figures"]
    s = f["settings"]
    steps = s["steps"]
    rows = []
    for c in f["combos"]:
        for sampler in dict.fromkeys(p["sampler"] for p in c["points"]):
            at = {p["steps"]: p for p in c["points"] if p["sampler"] == sampler}
            rows.append([c["objective"], c["backbone"], sampler, "/".join(str(at[k]["nfe"]) for k in steps)]
                        + [f"{at[k]['digit_accuracy']:.2f}/{at[k]['shape_accuracy']:.2f}, {at[k]['fid_like']:.0f}"
                           for k in steps]
                        + [f"{at[max(steps)]['images_per_s']:.0f}"])
    trained = "; ".join(f"{c['objective']}/{c['backbone']} {n(c['params'])} parameters, {n(c['train_steps'])} steps "
                        f"in {c['train_s']:.0f} s" for c in f["combos"])
    done = {f"{c['objective']}:{c['backbone']}" for c in f["combos"]}
    c0 = f["combos"][0]
    missing = [c for c in f.get("combos_planned", []) if c not in done]
    if missing:
        trained += f". Not measured (the run was stopped first): {', '.join(missing)}"
    return "\n".join([
        provenance(doc), "",
        f"Each objective/backbone trained once ({s['epochs']} epochs at batch 32; VAE {s['vae_steps']} steps), "
        f"sampled with guidance {s['guidance']:g}, {s['per_prompt']} images per prompt (22 prompts), "
        f"{s['threads']} thread; {f['wall_s']:.0f} s in all. Trained: {trained}. " + (
            f"FID-like floor (two real sets of {c0['fid_floor_per_prompt']} per prompt): {c0['fid_floor']}."
            if "fid_floor_per_prompt" in c0 else f"FID-like floor of the t2i_train stage's judge (two real sets of "
            f"t2i_train.eval_per_prompt per prompt, more than the sweep's): {c0['fid_floor']}."), "",
        table(["objective", "backbone", "sampler", "NFE at " + "/".join(map(str, steps)) + " steps"]
              + [f"{k} steps: digit/shape acc, FID" for k in steps] + [f"images/s at {max(steps)}"], rows), "",
        " ".join(f"![{Path(p).stem}]({p})" for p in f["plots"]),
    ])


def video(doc: dict) -> str:
    variants = doc["figures"]["variants"]
    columns = ("class_accuracy", "object_accuracy", "colour_accuracy", "motion_accuracy", "warp_error",
               "frame_difference", "identity_consistency", "fid_like")

    def cells(row: dict) -> list[str]:
        return ["–" if row.get(c) is None else f"{row[c]:.1f}" if c == "fid_like" else f"{row[c]:.3f}"
                for c in columns]

    rows = [[f"generated, temporal `{v}`", *cells(r["generated"])] for v, r in variants.items()]
    rows += [[name, *cells(row)] for name, row in next(iter(variants.values()))["references"].items()]
    train = "; ".join(f"`{v}`: {n(r['training']['denoiser_params'])} parameters, {n(r['training']['steps'])} steps "
                      f"in {r['training']['train_s']:.0f} s ({r['training']['train_cpu_s']:.0f} CPU s)"
                      for v, r in variants.items())
    first = next(iter(variants.values()))
    return "\n".join([
        provenance(doc), "",
        f"{train}; {first['data']['clips']} clips of {first['data']['frames']} frames at "
        f"{first['data']['frame_size']}×{first['data']['frame_size']}, {first['training']['eval_clips']} generated "
        f"clips judged (DDIM {first['training']['sample_steps']}, guidance {first['training']['guidance']:g}); "
        f"the judge scores held-out real frames {first['training']['judge_real_test_accuracy']:.3f}.", "",
        table(["clips", "class acc.", "object acc.", "colour acc.", "motion acc.", "warp error", "frame diff.",
               "identity consistency", "FID-like"], rows),
    ])


def consistency(doc: dict) -> str:
    f = doc["figures"]
    t, modes = f["teacher"], f["modes"]
    label = {"cm_distill": "CD student", "cm_train": "CT from scratch", "teacher": "teacher"}
    first = next(iter(modes.values()))

    def sampler(r):
        if r["model"] != "teacher":
            return "multistep consistency"
        return f"{r['sampler'].upper()} (t2i_train's default)" if r.get("default") else "DDIM on the same σ levels"

    def row(r):
        return [label[r["model"]], sampler(r), r["steps"], f"{r['digit_accuracy']:.3f}", f"{r['shape_accuracy']:.3f}",
                f"{r['fid_like']:.1f}", f"{r['images_per_s']:.1f}"]

    rows = [row(r) for m in modes.values() for r in m["rows"] if r["model"] != "teacher"]
    rows += [row(r) for r in first["rows"] if r["model"] == "teacher"]
    trained = "; ".join(f"{label['cm_' + mode]}: {m['steps']:,} steps in {m['train_s']:.0f} s (stage {m['stage_s']:.0f} s)"
                        for mode, m in modes.items())
    headline = [f"CD at {h['steps']} step{'s' if h['steps'] > 1 else ''}: FID-like {h['fid_like']:.1f} vs the teacher's "
                f"DDIM {h['teacher_ddim_fid_like']:.1f} at the same steps (ratio {h['fid_ratio_vs_teacher_ddim']:.2f}), "
                f"digit / shape accuracy {h['digit_accuracy']:.3f} / {h['shape_accuracy']:.3f} vs "
                f"{h['teacher_ddim_digit_accuracy']:.3f} / {h['teacher_ddim_shape_accuracy']:.3f}; "
                f"{h['speedup_vs_teacher_default']:.2f}× the teacher's images/s at its default steps"
                for h in modes.get("distill", {}).get("headline", []) if h["steps"] in (1, 2)]
    return "\n".join([
        provenance(doc), "",
        f"Teacher: t2i_train's UNet ({n(t['unet_params'])} parameters, {n(t['steps'])} steps), guidance "
        f"{first['guidance']:g} (two network passes per step; distilled into the CD student: one per step); "
        f"{trained}; judge accuracy on real images {first['judge_real_test_accuracy']:.3f}, FID-like floor "
        f"{first['fid_like_real_floor']}; {first['per_prompt']} images per prompt.", "",
        table(["model", "sampler", "steps", "digit accuracy", "shape accuracy", "FID-like", "images/s"], rows), "",
        "; ".join(headline) + ("." if headline else ""),
    ])


RENDERERS = {  # block name -> (results files, renderer)
    "chain": (["chain"], chain),
    "openai_load": (["openai_load"], openai_load),
    "triton_latency": (["triton_latency_pytorch", "triton_latency_onnx"], triton_latency),
    "serving_engines": (["serving_engines"], serving_engines),
    "sft_lora": (["sft_lora"], sft_lora),
    "alignment_methods": (["alignment_methods"], alignment_methods),
    "multirank_pretrain": (["multirank_pretrain"], multirank_pretrain),
    "dp_sft_dpo": (["dp_sft_dpo"], dp_sft_dpo),
    "pretrain_throughput": (["pretrain_throughput"], pretrain_throughput),
    "curate_throughput": (["curate_throughput"], curate_throughput),
    "curation_quality": (["curation_quality"], curation_quality),
    "multimodal_quality": (["multimodal_quality"], multimodal_quality),
    "zoo": (["zoo"], zoo),
    "video": (["video"], video),
    "nerf_vs_gsplat": (["nerf_vs_gsplat"], nerf_vs_gsplat),
    "t2i_steps": (["t2i_steps"], t2i_steps),
    "consistency": (["consistency"], consistency),
}


def render_block(name: str) -> str:
    """Return the rendered body of the README block `name` from its results files."""
    files, renderer = RENDERERS[name]
    return renderer(*(load(f) for f in files)) + "\n"


def render(text: str) -> tuple[str, list[str]]:
    """Return the README text with every results block rendered, and the names of blocks that changed."""
    changed = []

    def replace(match: re.Match) -> str:
        body = render_block(match["name"])
        if body != match["body"]:
            changed.append(match["name"])
        return match.group(1) + body + match.group(4)

    return BLOCK.sub(replace, text), changed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if a block differs")
    args = parser.parse_args(argv)
    text = README.read_text(encoding="utf-8")
    new, changed = render(text)
    if args.check:
        for name in changed:
            print(f"README block '{name}' differs from benchmarks/results (run python benchmarks/readme_tables.py)")
        return 1 if changed else 0
    README.write_text(new, encoding="utf-8")
    print(f"rendered {len(BLOCK.findall(text))} blocks; changed: {', '.join(changed) or 'none'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
