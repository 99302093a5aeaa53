"""Every CLI error path a user can hit ends in one clear line, never a traceback (issue 14).

Each case runs the real `aigc` in a subprocess and fails before any stage starts: bad overrides, a missing or
broken cluster profile, an unreachable cluster, a command whose upstream is missing, Triton not listening, a bad
held-out or checkpoint path, a bad --pose, a run dir locked by another process. Text from the system (paths,
exception messages) is printed literally: a path holding `[red]` or `[/a:/b]` is never read as rich markup.
"""

from __future__ import annotations

import dataclasses
import os
import shlex
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline import jobs
from pipeline.clusters import TunnelConfig
from pipeline.run_lock import run_dir_lock

ROOT = Path(__file__).parent.parent
SLURM_COMMANDS = {"sbatch", "squeue", "sacct", "scancel", "srun", "salloc", "scontrol", "sinfo", "sattach", "sstat"}
MARKUP = "[red]x[/a:/b]"  # a closing tag rich would refuse (MarkupError) and an opening one it would swallow


def aigc(*args: str, env: dict[str, str] | None = None, timeout: int = 120) -> subprocess.CompletedProcess:
    """Run the aigc CLI in a subprocess; return the completed process (output captured)."""
    env = dict(os.environ, COLUMNS="200", **(env or {}))  # rich wraps at the terminal width
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=ROOT)


def free_port() -> int:
    """Return a TCP port of 127.0.0.1 where nothing listens."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def error_line(result: subprocess.CompletedProcess, code: int, form: str) -> str:
    """Return the error message of `result` after checking its exit code and its shape.

    form "line": the whole output is one line; "usage": argparse's usage block, then one `error:` line;
    "last": other output first (the plan, NeMo-Run's log), the message is the last line.
    """
    out = result.stdout + result.stderr
    assert result.returncode == code, out
    assert "Traceback" not in out and "Exception ignored" not in out, out
    lines = [line.rstrip() for line in out.splitlines() if line.strip()]
    if form == "line":
        assert len(lines) == 1, out
    elif form == "usage":
        assert lines[0].startswith("usage: aigc") and ": error: " in lines[-1], out
        assert all(": error: " not in line for line in lines[:-1]), out
    else:
        assert sum(line.startswith("error:") for line in lines) == 1 and lines[-1].startswith("error:"), out
    return lines[-1]


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path | int]:
    """Files the cases refer to: an empty run dir, cluster profiles, held-out files, a job record of a cluster
    that cannot be reached, a PATH without Slurm."""
    tmp = tmp_path_factory.mktemp("cli_errors")
    port = free_port()
    (tmp / "empty").mkdir()
    (tmp / "a_file").write_text("not a directory\n")
    (tmp / "clusters.yaml").write_text(
        "far:\n  account: acct\n"
        f"  tunnel: {{kind: ssh, host: 127.0.0.1, port: {port}, user: me, job_dir: /tmp/aigc-jobs}}\n"
        "here:\n  account: acct\n  tunnel: {kind: local}\n"
    )
    (tmp / "broken.yaml").write_text("far: [1, 2\n")
    (tmp / "badkey.yaml").write_text("far:\n  account: acct\n  gpus: 8\n")
    (tmp / "not_json.jsonl").write_text("not json\n")
    (tmp / "heldout.jsonl").write_text('{"id": "a", "text": "The for statement"}\n')
    (tmp / "ckpt_without_config").mkdir()
    jobs.write_record(tmp / "unreachable", jobs.JobRecord(  # submitted through an ssh tunnel that no longer connects
        stage="sft", executor="slurm", job_id="4242", fingerprint="f", out_dir=str(tmp / "unreachable" / "sft"),
        log_dir="/tmp/aigc-jobs/x", experiment="aigc_1", job_name="aigc.sft", cluster="far",
        tunnel=dataclasses.asdict(TunnelConfig("ssh", "127.0.0.1", "me", "/tmp/aigc-jobs", port=port))))
    bin_dir = tmp / "bin"  # every program of PATH but Slurm's: a machine that is no Slurm login node
    bin_dir.mkdir()
    for folder in [Path(sys.executable).parent, *map(Path, os.environ.get("PATH", "").split(os.pathsep))]:
        for program in (folder.iterdir() if folder.is_dir() else ()):
            if program.name not in SLURM_COMMANDS and not os.path.lexists(bin_dir / program.name):
                (bin_dir / program.name).symlink_to(program)
    return {"tmp": tmp, "port": port, "bin": bin_dir}


# (id, argv with {tmp} and {port}, exit code, output form, what the message names)
CASES = [
    # overrides and configs: refused before the plan
    ("unknown-key", "run --run-dir {tmp}/r pretrain.nope=1", 2, "line",
     ["unknown key 'pretrain.nope'", "max_steps", "seq_length"]),
    ("unknown-bare-key-of-a-stage", "sft --run-dir {tmp}/r nope=1", 2, "line", ["unknown key 'sft.nope'", "lora_rank"]),
    ("unknown-run-key", "run --run-dir {tmp}/r nope=1", 2, "line", ["unknown key 'nope'", "threads", "seed"]),
    ("malformed-override", "run --run-dir {tmp}/r pretrain.max_steps", 2, "line",
     ["'pretrain.max_steps' is not key=value"]),
    ("bad-int", "run --run-dir {tmp}/r pretrain.max_steps=abc", 2, "line", ["pretrain.max_steps", "expected int", "'abc'"]),
    ("bad-bool", "run --run-dir {tmp}/r pretrain.bf16=maybe", 2, "line", ["pretrain.bf16", "expected a boolean"]),
    ("bad-json-list", "run --run-dir {tmp}/r curate.inputs=[1,", 2, "line", ["curate.inputs", "not a JSON list"]),
    ("bad-stage-ranks", "run --run-dir {tmp}/r stage_ranks=bogus", 2, "line", ["stage_ranks", "'bogus'", "stage=N"]),
    ("unknown-section", "run --run-dir {tmp}/r nosuch.x=1", 2, "line", ["unknown section 'nosuch'", "pretrain"]),
    ("unknown-config", "run --config nope --run-dir {tmp}/r", 2, "usage", ["--config", "invalid choice: 'nope'"]),
    ("nproc-zero", "run --nproc-per-node 0 --run-dir {tmp}/r", 2, "line", ["--nproc-per-node 0"]),
    ("nproc-on-slurm", "run --nproc-per-node 2 --executor slurm --run-dir {tmp}/r", 2, "line",
     ["--nproc-per-node 2", "cluster profile"]),
    ("run-dir-is-a-file", "run --run-dir {tmp}/a_file", 2, "line", ["a_file is a file"]),
    ("unknown-model", "pretrain --run-dir {tmp}/r pretrain.model=nope", 2, "line",
     ["pretrain: unknown model 'nope'", "micro"]),
    ("layout-that-does-not-fit", "pretrain --run-dir {tmp}/r pretrain.tensor_parallel=3", 2, "line",
     ["does not fit TP 3", "pretrain.tensor_parallel"]),
    ("multimodal-unknown-key", "t2i train --run-dir {tmp}/r nope=1", 2, "line", ["unknown key 't2i_train.nope'"]),
    ("multimodal-unknown-config", "nerf train --config nope", 2, "usage", ["invalid choice: 'nope'"]),
    # cluster profiles
    ("missing-profile-file", "run --executor slurm --cluster-profile {tmp}/missing.yaml --run-dir {tmp}/r", 2, "line",
     ["no cluster profile file at", "missing.yaml", "--cluster-profile"]),
    ("unknown-cluster", "run --executor slurm --cluster-profile {tmp}/clusters.yaml --cluster nope --run-dir {tmp}/r",
     2, "line", ["no cluster 'nope'", "far, here"]),
    ("cluster-not-chosen", "run --executor slurm --cluster-profile {tmp}/clusters.yaml --run-dir {tmp}/r", 2, "line",
     ["defines clusters far, here", "--cluster NAME"]),
    ("profile-not-yaml", "run --executor slurm --cluster-profile {tmp}/broken.yaml --run-dir {tmp}/r", 2, "line",
     ["broken.yaml: not valid YAML", "line 2"]),
    ("profile-unknown-key", "run --executor slurm --cluster-profile {tmp}/badkey.yaml --run-dir {tmp}/r", 2, "line",
     ["unknown key(s) ['gpus']", "gpus_per_node"]),
    # an unreachable cluster: no ssh server at the profile's host:port, no sbatch on a local tunnel
    ("ssh-unreachable", "run --config smoke --executor slurm --cluster-profile {tmp}/clusters.yaml --cluster far "
     "--run-dir {tmp}/ssh", 2, "last",
     ["cannot reach cluster 'far'", "ssh me@127.0.0.1:{port}", "[Errno None] Unable to connect to port {port}"]),
    ("no-sbatch", "run --config smoke --executor slurm --cluster-profile {tmp}/clusters.yaml --cluster here "
     "--run-dir {tmp}/nosbatch", 2, "last", ["cannot submit to cluster 'here'", "'sbatch' is not found"]),
    ("logs-of-unreachable-job", "logs sft --run-dir {tmp}/unreachable", 2, "last",
     ["cannot reach the cluster of job 4242 (sft)", "{port}"]),
    ("cancel-on-unreachable-cluster", "cancel --run-dir {tmp}/unreachable", 2, "last",
     ["cannot reach the cluster of job 4242 (sft) to cancel it"]),
    # upstream missing: nothing ran, nothing to read
    ("status-without-run-dir", "status --run-dir {tmp}/missing", 2, "line", ["no run directory at", "missing"]),
    ("report-without-run-dir", "report --run-dir {tmp}/missing", 2, "line", ["no run directory at", "missing"]),
    ("report-port-without-serve", "report --run-dir {tmp}/empty --port 9", 2, "line", ["--port", "add --serve"]),
    ("logs-without-job", "logs sft --run-dir {tmp}/empty", 1, "line", ["no job of stage 'sft'", "empty"]),
    ("logs-unknown-stage", "logs nope --run-dir {tmp}/empty", 2, "line", ["unknown stage 'nope'", "tokenize"]),
    ("logs-without-run-dir", "logs sft --run-dir {tmp}/missing", 2, "line", ["no run directory at"]),
    ("cancel-without-run-dir", "cancel --run-dir {tmp}/missing", 2, "line", ["no run directory at"]),
    ("cancel-stage-without-job", "cancel pretrain --run-dir {tmp}/unreachable", 1, "line",
     ["no Slurm job of stage 'pretrain'"]),
    ("cancel-unknown-stage", "cancel nope --run-dir {tmp}/empty", 2, "line", ["unknown stage 'nope'"]),
    ("serve-without-export", "serve --run-dir {tmp}/empty", 2, "line",
     ["no Triton repository at", "empty/export/triton_repo", "export"]),
    ("serve-repo-missing", "serve --repo {tmp}/missing_repo", 2, "line", ["no Triton repository at", "missing_repo"]),
    ("serve-repo-without-models", "serve --repo {tmp}/empty", 2, "line", ["no Triton model repository", "config.pbtxt"]),
    ("serve-bad-limit", "serve --max-concurrent 0 --run-dir {tmp}/empty", 2, "line", ["--max-concurrent", "positive"]),
    ("t2i-sample-untrained", "t2i sample 'a red circle' --run-dir {tmp}/empty", 2, "line",
     ["no trained model in", "aigc t2i train"]),
    ("nerf-render-untrained", "nerf render --run-dir {tmp}/empty", 2, "line", ["no trained NeRF in", "aigc nerf train"]),
    ("nerf-render-bad-pose", "nerf render --pose 1,2,3,4 --run-dir {tmp}/empty", 2, "line",
     ["--pose", "got 4 numbers"]),
    ("nerf-render-pose-not-numbers", "nerf render --pose a,b --run-dir {tmp}/empty", 2, "line",
     ["--pose 'a,b'", "numbers"]),
    # Triton not ready: nothing listens at the port
    ("query-http-not-listening", "query hello --url 127.0.0.1:{port} --timeout 10", 1, "line",
     ["cannot reach Triton at 127.0.0.1:{port} (http)"]),
    ("query-grpc-not-listening", "query hello --url 127.0.0.1:{port} --protocol grpc --timeout 10", 1, "line",
     ["cannot reach Triton at 127.0.0.1:{port} (grpc)"]),
    ("query-url-with-scheme", "query hello --url http://127.0.0.1:{port}", 2, "usage", ["HOST:PORT without a scheme"]),
    ("query-url-bad-port", "query hello --url 127.0.0.1:abc", 2, "usage", ["--url '127.0.0.1:abc'"]),
    ("query-stream-over-http", "query hello --stream --protocol http", 2, "usage", ["--stream needs --protocol grpc"]),
    # eval-checkpoint (each case imports transformers: a few seconds): a held-out file that is not documents, a
    # checkpoint dir that is none; a missing held-out file is the square-bracket case below
    ("eval-heldout-not-json", "eval-checkpoint {tmp}/ckpt_without_config --heldout {tmp}/not_json.jsonl", 2, "line",
     ["held-out file", "not_json.jsonl:1: not JSON"]),
    ("eval-checkpoint-without-config", "eval-checkpoint {tmp}/ckpt_without_config --heldout {tmp}/heldout.jsonl", 2,
     "line", ["no HF checkpoint directory at", "ckpt_without_config", "config.json"]),
]


@pytest.mark.parametrize("argv, code, form, names", [case[1:] for case in CASES], ids=[case[0] for case in CASES])
def test_error_path_ends_in_one_clear_line(world, argv, code, form, names):
    fill = {"tmp": world["tmp"], "port": world["port"]}
    args = [part.format(**fill) for part in shlex.split(argv)]
    env = {"PATH": str(world["bin"])} if "nosbatch" in argv else None  # no Slurm here: sbatch is not found
    line = error_line(aigc(*args, env=env), code, form)
    for name in names:
        assert name.format(**fill) in line, line


def test_run_dir_locked_by_another_process_names_it_and_prints_its_path_literally(tmp_path):
    run_dir = tmp_path / f"run{MARKUP}"
    with run_dir_lock(run_dir):  # this test process is the other aigc
        for argv in (["run"], ["tokenize", "vocab_size=300"], ["t2i", "vae"]):
            line = error_line(aigc(*argv, "--run-dir", str(run_dir)), 2, "line")
            assert line == (f"error: run directory {run_dir} is in use by another aigc (pid {os.getpid()}); "
                            "wait for it to finish, or use another --run-dir")


@pytest.mark.parametrize("argv", [
    "status --run-dir {p}",
    "run --executor slurm --cluster-profile {p}.yaml --run-dir {tmp}/r",
    "run --run-dir {tmp}/r pretrain.max_steps={p}",
    "serve --repo {p}",
    "nerf render --run-dir {p}",
    "eval-checkpoint {tmp} --heldout {p}.jsonl",
], ids=["status", "profile", "override-value", "serve", "nerf-render", "eval-checkpoint"])
def test_system_text_with_square_brackets_is_printed_literally(tmp_path, argv):
    path = str(tmp_path / f"p{MARKUP}")
    args = [part.format(p=path, tmp=tmp_path) for part in shlex.split(argv)]
    line = error_line(aigc(*args), 2, "line")
    assert MARKUP in line and "MarkupError" not in line, line
