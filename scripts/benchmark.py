"""Print phf's speed on this machine: training tokens/s per objective, generation tokens/s, each
scorer's texts/s, the scoring pipeline's documents/s with one worker and with one per core, and
PPO episodes/s with the share of time spent generating, and the per-job launch overhead of
local and SLURM sweeps.

Measures the default run's own code paths (the config is composed exactly as `python -m phf.run`
composes it, overrides included):

    python scripts/benchmark.py                       # everything, default tiny model
    python scripts/benchmark.py --only train generation -- hardware=gpu model=gpt2
    python scripts/benchmark.py --only scorers pipeline
    python scripts/benchmark.py --only ppo -- model.pretrained=runs:/<mle run id>/model
    python scripts/benchmark.py --only launch      # SLURM too when scripts/start-local-slurm.sh ran
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from datetime import datetime, timezone
from itertools import islice
from pathlib import Path

import torch

from phf.config import compose_config
from phf.data.corpus import iter_documents
from phf.data.scoring import list_source_files, score_corpus
from phf.distributed import SINGLE_PROCESS
from phf.evaluation import generate_samples
from phf.hardware import resolve_placement
from phf.models import load_model_and_tokenizer
from phf.run import seed_everything
from phf.scorers import build_scorer
from phf.stages.ppo import PPOStage
from phf.stages.pretrain import PretrainStage

SECTIONS = ["train", "generation", "scorers", "pipeline", "ppo", "launch"]


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=10, help="timed optimizer steps")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument(
        "--only", nargs="+", choices=SECTIONS, default=SECTIONS, help="sections to run"
    )
    parser.add_argument("--pipeline-files", type=int, default=1000)
    parser.add_argument("--rollouts", type=int, default=5, help="timed PPO iterations")
    parser.add_argument("--launch-jobs", type=int, default=4, help="jobs per timed sweep")
    parser.add_argument(
        "--objectives",
        nargs="+",
        choices=OBJECTIVES,
        default=OBJECTIVES,
        help="objectives whose training step is timed (mle first: the others are compared to it)",
    )
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, as for phf.run")
    args = parser.parse_args()
    if "train" in args.only or "generation" in args.only:
        benchmark_model(args)
    if "scorers" in args.only:
        benchmark_scorers()
    if "pipeline" in args.only:
        benchmark_pipeline(args.pipeline_files)
    if "ppo" in args.only:
        benchmark_ppo(args.overrides, args.warmup, args.rollouts)
    if "launch" in args.only:
        benchmark_launch(args.launch_jobs)


OBJECTIVES = ["mle", "filtering", "conditional", "unlikelihood", "awr", "rwr"]


def benchmark_model(args: argparse.Namespace) -> None:
    cfg = compose_config(args.overrides)
    placement = resolve_placement(cfg.hardware)
    print(
        f"device {placement.device} ({placement.precision}), {torch.get_num_threads()} threads, "
        f"model {cfg.model.name}, task {cfg.task.name}"
    )
    if "train" in args.only:
        rates = {}
        for objective in args.objectives:
            rates[objective] = benchmark_training(
                [*args.overrides, f"objective={objective}"], args.warmup, args.steps
            )
            ratio = f" ({rates[objective] / rates['mle']:.2f}x mle)" if "mle" in rates else ""
            print(f"training {objective:>12}: {rates[objective]:,.0f} tokens/s{ratio}")
    if "generation" in args.only:
        seed_everything(cfg.seed)
        model, tokenizer = load_model_and_tokenizer(cfg.model, cfg.train.block_size)
        benchmark_generation(cfg, model.to(placement.device), tokenizer, placement)


def benchmark_training(overrides: list[str], warmup: int, steps: int) -> float:
    """Tokens/s of the stage's own training step for one objective, data pipeline included."""
    cfg = compose_config(overrides)
    seed_everything(cfg.seed)
    placement = resolve_placement(cfg.hardware)
    training = PretrainStage.build(cfg, placement, SINGLE_PROCESS)
    for _ in range(warmup):
        training.step()
    synchronize(placement.device)
    start, tokens_before = time.perf_counter(), training.progress
    for _ in range(steps):
        training.step()
    synchronize(placement.device)
    return (training.progress - tokens_before) / (time.perf_counter() - start)


def benchmark_generation(cfg, model, tokenizer, placement) -> None:
    generation = cfg.eval.generation
    prompts = [""] * generation.num_samples
    generate_samples(model, tokenizer, prompts, generation, placement, seed=0)  # warm-up
    samples = generate_samples(model, tokenizer, prompts, generation, placement, seed=1)
    print(
        f"generation: {sum(samples.lengths) / samples.seconds:,.0f} tokens/s, "
        f"{len(samples.lengths) / samples.seconds:.1f} samples/s "
        f"({generation.num_samples} samples of <= {generation.max_new_tokens} tokens, "
        f"batch {generation.batch_size}, KV cache)"
    )


def benchmark_ppo(overrides: list[str], warmup: int, rollouts: int) -> None:
    """PPO episodes/s of the stage's own iteration (generate, score, forward the policy and the
    reference, GAE, ppo_epochs of updates) and the share of it spent generating."""
    cfg = compose_config(["objective=ppo", *overrides])
    seed_everything(cfg.seed)
    placement = resolve_placement(cfg.hardware)
    training = PPOStage.build(cfg, placement, SINGLE_PROCESS)
    for _ in range(warmup):
        training.step()
    synchronize(placement.device)
    start, episodes_before = time.perf_counter(), training.progress
    generating = 0.0
    for _ in range(rollouts):
        step_start = time.perf_counter()
        metrics = training.step()
        generating += metrics["time/generation_share"] * (time.perf_counter() - step_start)
    synchronize(placement.device)
    seconds = time.perf_counter() - start
    ppo = cfg.ppo
    print(
        f"ppo: {(training.progress - episodes_before) / seconds:.1f} episodes/s, "
        f"{generating / seconds:.0%} of the time generating ({ppo.rollout_batch_size} episodes "
        f"of <= {ppo.response_length} tokens per rollout, {ppo.ppo_epochs} epochs x "
        f"{ppo.rollout_batch_size // ppo.mini_batch_size} minibatches; reward "
        f"{training.reward_source})"
    )


def benchmark_scorers() -> None:
    """texts/s of every scorer on real segments: prose sentences, or code lines for pep8."""
    prose = [
        t for doc in islice(iter_documents("toxicity", "builtin", "test"), 300) for t in doc.texts
    ]
    code = [t for doc in islice(iter_documents("pep8", "builtin", "test"), 60) for t in doc.texts]
    for name in ("profanity", "pii", "pep8", "detoxify"):
        texts = code if name == "pep8" else prose
        try:
            scorer = build_scorer(compose_config([f"scorer={name}"]).scorer)
        except RuntimeError as error:  # detoxify without local weights, offline
            print(f"scorer {name}: not measured ({error})".splitlines()[0])
            continue
        scorer.score_texts(texts[:50])  # warm-up
        start = time.perf_counter()
        scorer.score_texts(texts)
        rate = len(texts) / (time.perf_counter() - start)
        kind = "code lines" if name == "pep8" else "sentences"
        print(f"scorer {name}: {rate:,.0f} texts/s ({len(texts)} {kind})")


def benchmark_pipeline(n_files: int) -> None:
    """The scoring pipeline (pep8 scorer) on real .py files: one worker vs one per core."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = list_source_files(stdlib)
    files = [f for f in files if f.suffix == ".py" and "site-packages" not in f.parts][:n_files]
    scorer_cfg = compose_config(["scorer=pep8"]).scorer
    cores = os.cpu_count() or 1
    rates = {}
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "py"
        source.mkdir()
        for i, file in enumerate(files):
            (source / f"{i:05d}_{file.name}").symlink_to(file)
        for workers in sorted({1, cores}):
            report = score_corpus(
                str(source),
                Path(tmp) / f"out{workers}",
                scorer_cfg,
                "lines",
                workers=workers,
                shard_size=20,
                progress=False,
            )
            rates[workers] = report.documents_per_s
            print(
                f"scoring pipeline, {report.documents} .py files ({report.chars / 1e6:.1f}M chars),"
                f" pep8, {workers} worker(s): {report.documents_per_s:.1f} files/s "
                f"({report.seconds:.1f} s)"
            )
    if cores > 1:
        print(f"scoring pipeline speed-up with {cores} workers: {rates[cores] / rates[1]:.2f}x")


# A job with almost no work of its own, so that a sweep's time is mostly launching.
TRIVIAL_JOB = [
    "hardware.num_threads=1",
    "model.architecture.n_layer=1",
    "model.architecture.n_head=2",
    "model.architecture.n_embd=32",
    "train.block_size=32",
    "train.batch_size=4",
    "train.max_steps=1",
    "eval.generation.num_samples=25",
    "eval.generation.max_new_tokens=4",
    "eval.max_blocks=2",
    "tracking.log_model=false",
]
LOCAL_SLURM = [
    "hardware=slurm",
    "hydra.launcher.gpus_per_node=0",
    "hydra.launcher.cpus_per_task=1",
    "hydra.launcher.mem_gb=null",
    "hydra.launcher.timeout_min=15",
    "hydra.launcher.array_parallelism=1",  # one job at a time: overheads add up, not overlap
]


def _job_process_starts(sweep_dir: Path) -> list[datetime]:
    """When each SLURM job's process began: the first line submitit's job log writes."""
    starts = []
    for log in sorted((sweep_dir / ".submitit").glob("*/*_0_log.out")):
        first = log.read_text().splitlines()[0]  # "submitit INFO (2026-11-21 06:50:07,451) - ..."
        stamp = first[first.index("(") + 1 : first.index(")")]
        starts.append(datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f"))
    return starts


def benchmark_launch(n_jobs: int) -> None:
    """Per-job launch overhead of a sweep: its wall time beyond the jobs' own work, from the
    marginal cost of n_jobs jobs over one job, jobs one at a time. A job's own work is its
    MLflow run for the basic launcher (jobs share the launching process) and, on SLURM, its
    whole process, from start (submitit's first log line) to the end of its run: importing
    torch and the rest is work any job does, however it is launched."""
    import mlflow

    launchers = {"local (basic launcher)": []}
    if shutil.which("sbatch"):
        launchers["SLURM (submitit, one job at a time)"] = LOCAL_SLURM
    else:
        print("launch overhead on SLURM: not measured (no sbatch; scripts/start-local-slurm.sh)")
    for name, extra in launchers.items():
        walls, own = {}, {}
        for n in (1, n_jobs):
            with tempfile.TemporaryDirectory() as tmp:
                uri = f"sqlite:///{tmp}/mlflow.db"
                seeds = ",".join(str(i) for i in range(n))
                command = [
                    sys.executable,
                    "-m",
                    "phf.run",
                    "-m",
                    f"seed={seeds}",
                    *TRIVIAL_JOB,
                    *extra,
                    f"tracking.uri={uri}",
                    f"hydra.sweep.dir={tmp}/sweep",
                ]
                start = time.perf_counter()
                subprocess.run(command, cwd=tmp, check=True, capture_output=True)
                walls[n] = time.perf_counter() - start
                mlflow.set_tracking_uri(uri)
                runs = mlflow.search_runs(search_all_experiments=True)
                runs = runs[runs["tags.sweep"] != "parent"].sort_values("start_time")
                ends = runs.end_time.dt.tz_convert(None).dt.tz_localize(None)
                if extra:  # SLURM: from each job process's start
                    local = [
                        s.astimezone().astimezone(timezone.utc).replace(tzinfo=None)
                        for s in _job_process_starts(Path(tmp) / "sweep")
                    ]
                    own[n] = sum((e - s).total_seconds() for e, s in zip(ends, local, strict=True))
                else:
                    own[n] = float((runs.end_time - runs.start_time).dt.total_seconds().sum())
        marginal = (walls[n_jobs] - walls[1]) / (n_jobs - 1)
        own_per_job = (own[n_jobs] - own[1]) / (n_jobs - 1)
        print(
            f"launch overhead, {name}: {marginal - own_per_job:.2f} s per job beyond its own "
            f"work ({marginal:.2f} s per extra job, of which {own_per_job:.2f} s its own work)"
        )


if __name__ == "__main__":
    main()
