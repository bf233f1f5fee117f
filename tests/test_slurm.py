"""Sweeps on a real SLURM cluster: the one-node cluster of scripts/start-local-slurm.sh.

CI starts it (.ci/run); on a machine without it these tests skip and say why, except under
CI=true, where a missing cluster is a failure.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import mlflow
import pandas as pd
import pytest

from multirun_analysis.__main__ import main as analysis_main
from multirun_analysis.plots import curve_plot, pareto_plot
from multirun_analysis.summary import load_runs
from tests.conftest import multirun_command

pytestmark = pytest.mark.slow

# The local cluster has 2 CPUs and no GPUs: one CPU and one torch thread per job.
LOCAL_SLURM = [
    "hardware=slurm",
    "hydra.launcher.partition=debug",
    "hydra.launcher.gpus_per_node=0",
    "hydra.launcher.cpus_per_task=1",
    "hydra.launcher.mem_gb=null",
    "hydra.launcher.timeout_min=15",
    "hardware.num_threads=1",
    "hardware.micro_batch_size=16",
]


@pytest.fixture(scope="module", autouse=True)
def slurm_cluster() -> None:
    reason = None
    if shutil.which("sbatch") is None:
        reason = "sbatch is not installed"
    else:
        state = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True)
        if state.returncode != 0 or not state.stdout.strip():
            reason = f"no SLURM controller answers ({state.stderr.strip()})"
    if reason is None:
        return
    hint = "start one with: bash scripts/start-local-slurm.sh"
    if os.environ.get("CI") == "true":
        pytest.fail(f"SLURM tests must run in CI but {reason}; {hint}")
    pytest.skip(f"{reason}; {hint}")


def sweep(
    run_dir: Path, *overrides: str, wait: bool = True
) -> subprocess.Popen | subprocess.CompletedProcess:
    command = multirun_command(run_dir, *LOCAL_SLURM, *overrides)
    if wait:
        return subprocess.run(command, cwd=run_dir, capture_output=True, text=True, timeout=600)
    log = open(run_dir / "sweep.log", "w")  # noqa: SIM115 - the sweep process owns it
    return subprocess.Popen(command, cwd=run_dir, stdout=log, stderr=subprocess.STDOUT)


def children(run_dir: Path):
    mlflow.set_tracking_uri(f"sqlite:///{run_dir / 'mlflow.db'}")
    runs = mlflow.search_runs(search_all_experiments=True)
    parents = runs[runs["tags.sweep"] == "parent"]
    assert len(parents) == 1
    kids = runs[runs["tags.mlflow.parentRunId"] == parents.run_id.iloc[0]]
    return parents.iloc[0], kids


def test_a_2x2_sweep_runs_as_slurm_jobs_under_one_parent_run(run_dir: Path) -> None:
    result = sweep(run_dir, "objective=mle,unlikelihood", "seed=0,1")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "4 of 4 jobs finished; 0 failed." in result.stdout
    parent, kids = children(run_dir)
    assert parent.status == "FINISHED" and len(kids) == 4
    assert set(kids.status) == {"FINISHED"}
    assert sorted(kids["tags.overrides"]) == [
        "objective=mle seed=0",
        "objective=mle seed=1",
        "objective=unlikelihood seed=0",
        "objective=unlikelihood seed=1",
    ]
    # Seeds of one configuration share a signature; the two objectives do not.
    assert kids.groupby("tags.objective")["tags.signature"].nunique().tolist() == [1, 1]
    assert kids["tags.signature"].nunique() == 2
    # Each job ran in SLURM: submitit wrote its logs in the sweep's .submitit folder.
    assert len(list((run_dir / "sweep" / ".submitit").glob("*/*_log.out"))) == 4

    # multirun_analysis on this real sweep, by its id: 2 configurations x 2 seeds.
    out = run_dir / "analysis"
    code = analysis_main(
        [
            parent.run_id,
            "--tracking-uri",
            f"sqlite:///{run_dir / 'mlflow.db'}",
            "--metrics",
            "score",
            "eval/lm_loss",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    table = pd.read_csv(out / "summary.csv").set_index("objective.name")
    assert list(table.index) == ["mle", "unlikelihood"] and list(table["n"]) == [2, 2]
    for objective, group in kids.groupby("tags.objective"):
        assert table.loc[objective, "score mean"] == pytest.approx(group["metrics.score"].mean())
        assert table.loc[objective, "eval/lm_loss std"] == pytest.approx(
            group["metrics.eval/lm_loss"].std()
        )
    pareto = pareto_plot(load_runs(parent.run_id), "eval/lm_loss").axes[0]
    assert len([line for line in pareto.lines if line.get_marker() == "o"]) == 2
    curves = curve_plot(load_runs(parent.run_id)).axes[0]
    assert {line.get_label() for line in curves.lines} == {"mle", "unlikelihood"}
    assert all(list(line.get_xdata()) == [0, 128, 256] for line in curves.lines)  # tokens seen
    assert (out / "pareto.png").stat().st_size > 0 and (out / "curves.png").stat().st_size > 0


PREEMPTED = {
    # stage: (overrides, the evaluation step after which job 1 is preempted, compared metrics)
    "pretrain": (
        ["train.max_steps=150", "train.eval_steps=50", "train.save_steps=1000"],
        50,
        ("train/loss", "eval/lm_loss", "score", "score_max_at_25", "tokens_seen"),
    ),
    "reward": (
        ["objective=reward", "train.max_steps=60", "train.eval_steps=20", "train.save_steps=1000"],
        20,
        ("train/loss", "eval/accuracy", "eval/loss", "comparisons_seen"),
    ),
    "ppo": (
        [
            "objective=ppo",
            "ppo.rollout_batch_size=8",
            "ppo.mini_batch_size=4",
            "ppo.ppo_epochs=1",
            "ppo.response_length=8",
            "ppo.min_response_length=4",
            "ppo.normalization_episodes=16",
            "eval.kl_samples=8",
            "train.max_steps=12",
            "train.eval_steps=3",
            "train.save_steps=1000",
        ],
        3,
        ("objective/kl", "loss/policy", "score", "kl", "episodes"),
    ),
}


@pytest.mark.parametrize("stage", list(PREEMPTED))
def test_a_preempted_job_requeues_resumes_and_ends_like_an_uninterrupted_one(
    run_dir: Path, stage: str
) -> None:
    """Two identical jobs (they differ only in run name); job 1 gets SLURM's preemption signal
    mid-run, checkpoints, is requeued, resumes and must end with job 0's exact numbers, for
    every stage."""
    overrides, after_step, metrics = PREEMPTED[stage]
    process = sweep(
        run_dir,
        "tracking.run_name=uninterrupted,preempted",
        "train.log_steps=1",
        *overrides,
        wait=False,
    )
    objective = "mle" if stage == "pretrain" else stage
    log = run_dir / "sweep" / "toxicity" / objective / "1" / "phf.log"
    deadline = time.time() + 300
    while not (log.is_file() and f"eval at step {after_step} " in log.read_text()):
        assert process.poll() is None, (run_dir / "sweep.log").read_text()[-3000:]
        assert time.time() < deadline, f"job 1 never reached step {after_step}"
        time.sleep(0.2)
    jobs = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True).stdout
    job_1 = next(j for j in jobs.split() if j.endswith("_1"))
    subprocess.run(["scancel", "--signal=USR2", job_1], check=True)
    assert process.wait(timeout=600) == 0, (run_dir / "sweep.log").read_text()[-3000:]

    text = log.read_text()
    assert "received SIGUSR2: checkpointing after the current step" in text
    assert "Requeued job" in text and "resumed from" in text
    _, kids = children(run_dir)
    kids = kids.set_index("tags.mlflow.runName")
    assert set(kids.status) == {"FINISHED"} and len(kids) == 2
    assert int(kids.loc["preempted", "tags.phf.preempted_at_step"]) >= after_step
    for metric in metrics:
        column = f"metrics.{metric}"
        assert kids.loc["preempted", column] == kids.loc["uninterrupted", column], metric


def test_a_job_with_two_tasks_trains_data_parallel(run_dir: Path) -> None:
    """tasks_per_node=2: SLURM starts two processes, submitit's environment joins them into
    one process group (gloo on the CPU), and only rank 0 records the run."""
    result = sweep(run_dir, "hydra.launcher.tasks_per_node=2", "train.max_steps=3")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    _, kids = children(run_dir)
    assert len(kids) == 1 and kids.status.iloc[0] == "FINISHED"
    assert kids["metrics.tokens_seen"].iloc[0] == 3 * 4 * 32
    log = (run_dir / "sweep" / "toxicity" / "mle" / "0" / "phf.log").read_text()
    assert log.count("in each of 2 processes") == 2  # both ranks set up, one log per job
