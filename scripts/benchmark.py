"""Print phf's speed on this machine: the training loader's tokens/s from a token store (beside
tokenizing on the fly), preparing a store with one worker and with one per core, training
tokens/s per objective with and without torch.compile and its MFU, generation tokens/s, each
scorer's texts/s, the scoring pipeline's documents/s, SFT tokens/s and DPO pairs/s, PPO, GRPO
and RLOO episodes/s with the share of time spent generating, and the per-job launch overhead
of local and SLURM sweeps.

Measures the default run's own code paths (the config is composed exactly as `python -m phf.run`
composes it, overrides included):

    python scripts/benchmark.py                       # everything, default tiny model
    python scripts/benchmark.py --only loader prepare
    python scripts/benchmark.py --only mfu -- hardware=gpu model=gpt2 train.block_size=1024
    python scripts/benchmark.py --only train generation -- hardware=gpu model=gpt2
    python scripts/benchmark.py --only scorers pipeline
    python scripts/benchmark.py --only sft dpo ppo grpo rloo -- model.pretrained=<an MLE model>
    python scripts/benchmark.py --only launch      # SLURM too when scripts/start-local-slurm.sh ran
    python scripts/benchmark.py --only data_parallel -- model.pretrained=<an MLE model>
"""

from __future__ import annotations

if __name__ == "__main__":  # measure what `phf` runs: with its allocator settings
    from phf.launch import reexec_with_malloc_tuning

    reexec_with_malloc_tuning()

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
from phf.run import STAGES, seed_everything
from phf.scorers import build_scorer
from phf.stages.loop import synchronize
from phf.stages.pretrain import PretrainStage
from phf.throughput import flops_per_token, peak_flops

SECTIONS = [
    "loader",
    "prepare",
    "train",
    "mfu",
    "generation",
    "scorers",
    "pipeline",
    "sft",
    "dpo",
    "ppo",
    "grpo",
    "rloo",
    "data_parallel",
    "launch",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=10, help="timed optimizer steps")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument(
        "--only", nargs="+", choices=SECTIONS, default=SECTIONS, help="sections to run"
    )
    parser.add_argument("--pipeline-files", type=int, default=1000)
    parser.add_argument(
        "--rollouts", type=int, default=5, help="timed steps of sft, dpo, ppo, grpo, rloo"
    )
    parser.add_argument("--launch-jobs", type=int, default=4, help="jobs per timed sweep")
    parser.add_argument(
        "--objectives",
        nargs="+",
        choices=OBJECTIVES,
        default=OBJECTIVES,
        help="objectives whose training step is timed (mle first: the others are compared to it)",
    )
    parser.add_argument(
        "--peak-tflops", type=float, default=None, help="the device's peak, for MFU"
    )
    parser.add_argument("--repeats", type=int, default=2, help="interleaved A/B pairs")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, as for phf.run")
    args = parser.parse_args()
    if "loader" in args.only:
        benchmark_loader()
    if "prepare" in args.only:
        benchmark_prepare()
    if "mfu" in args.only:
        benchmark_mfu(args)
    if "train" in args.only or "generation" in args.only:
        benchmark_model(args)
    if "scorers" in args.only:
        benchmark_scorers()
    if "pipeline" in args.only:
        benchmark_pipeline(args.pipeline_files)
    for objective in STAGE_UNITS:
        if objective in args.only:
            benchmark_stage(objective, args.overrides, args.warmup, args.rollouts)
    if "data_parallel" in args.only:
        benchmark_data_parallel(args.overrides, args.rollouts, args.repeats)
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


def timed_training(overrides: list[str], warmup: int, steps: int) -> tuple[float, PretrainStage]:
    """Tokens/s of the stage's own training step, data pipeline included, and the stage."""
    cfg = compose_config(overrides)
    seed_everything(cfg.seed)
    placement = resolve_placement(cfg.hardware)
    training = PretrainStage.build(cfg, placement, SINGLE_PROCESS)
    for _ in range(warmup):  # with compile, the first steps compile
        training.step()
    synchronize(placement.device)
    start, tokens_before = time.perf_counter(), training.progress
    for _ in range(steps):
        training.step()
    synchronize(placement.device)
    return (training.progress - tokens_before) / (time.perf_counter() - start), training


def benchmark_training(overrides: list[str], warmup: int, steps: int) -> float:
    return timed_training(overrides, warmup, steps)[0]


def benchmark_mfu(args: argparse.Namespace) -> None:
    """Training tokens/s with and without torch.compile (interleaved: A, B, A, B), and MFU:
    tokens/s x FLOPs per token / the device's peak (phf/throughput.py)."""
    rates: dict[str, list[float]] = {"eager": [], "compiled": []}
    stage = None
    device = resolve_placement(compose_config(args.overrides).hardware).device
    peak_before, _ = peak_flops(device, args.peak_tflops)
    for _ in range(args.repeats):
        for name, flag in (("eager", "false"), ("compiled", "true")):
            overrides = [*args.overrides, f"hardware.compile={flag}"]
            rate, stage = timed_training(overrides, max(args.warmup, 3), args.steps)
            rates[name].append(rate)
    # The CPU's peak is measured before and after the runs, the higher one used: a share of
    # the best this machine did.
    peak, source = peak_flops(device, args.peak_tflops)
    peak = max(peak, peak_before)
    per_token = flops_per_token(stage.model, stage.cfg.train.block_size)
    print(
        f"model {stage.cfg.model.name}: {per_token / 1e6:.1f} MFLOP per token (6N + 12LHQT, "
        f"block {stage.cfg.train.block_size}); peak {peak / 1e12:.3f} TFLOP/s ({source}); "
        f"{device} {stage.placement.precision}"
    )
    for name, values in rates.items():
        best = max(values)
        print(
            f"training {name}: {', '.join(f'{v:,.0f}' for v in values)} tokens/s; best "
            f"{best:,.0f} = {best * per_token / 1e9:.1f} GFLOP/s, MFU {best * per_token / peak:.1%}"
        )
    ratio = max(rates["compiled"]) / max(rates["eager"])
    print(f"torch.compile speed-up: {ratio:.2f}x (best of {args.repeats} interleaved runs each)")


def on_the_fly_batches(tokenizer, block_size: int, batch_size: int):
    """Batches as training built them before token stores: tokenize documents while packing,
    Python lists into tensors (the reference the store is measured against)."""
    from phf.data.store import tokenize_documents

    ids_buffer: list = []
    scores_buffer: list = []
    blocks: list = []
    documents = iter_documents("toxicity", "builtin", "train")
    while chunk := [d for d in islice(documents, 64) if d.texts]:
        for doc in tokenize_documents(chunk, tokenizer):
            ids_buffer.extend(doc.ids.tolist())
            scores_buffer.extend(doc.scores.tolist())
        while len(ids_buffer) >= block_size:
            blocks.append((ids_buffer[:block_size], scores_buffer[:block_size]))
            del ids_buffer[:block_size], scores_buffer[:block_size]
            if len(blocks) == batch_size:
                yield {
                    "input_ids": torch.tensor([b[0] for b in blocks], dtype=torch.long),
                    "token_scores": torch.tensor([b[1] for b in blocks], dtype=torch.float32),
                }
                blocks = []


def benchmark_loader(block_size: int = 1024, batch_size: int = 8, batches: int = 150) -> None:
    """Training batches per second at block 1024, batch 8 (the built-in toxicity corpus): from
    the token store in this process (one core), in one DataLoader worker and in one per core,
    and tokenizing on the fly; conditional training's control tokens too."""
    from phf.data.blocks import ControlTokens, PackedBlocks, control_token_ids, training_batches
    from phf.data.corpus import split_source
    from phf.data.store import ensure_store
    from phf.tokenizer import load_tokenizer

    tokenizer = load_tokenizer("builtin")
    # One core for the on-the-fly reference too: the tokenizer's own threads would take both.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    with tempfile.TemporaryDirectory() as cache:
        store = ensure_store(split_source("toxicity", "builtin", "train"), tokenizer, Path(cache))
        aligned, misaligned = control_token_ids(tokenizer)
        controls = ControlTokens(aligned, misaligned, 0.143, 0.01)
        cores = os.cpu_count() or 1
        cases = [
            ("store, in-process (1 core)", None, 0),
            ("store, conditional, in-process", controls, 0),
        ]
        cases += [(f"store, {w} DataLoader worker(s)", None, w) for w in sorted({1, cores})]
        rates = {}
        for name, control, workers in cases:
            blocks = PackedBlocks(store, block_size, seed=0, controls=control)
            loader = training_batches(blocks, batch_size, 0, batches + 5, workers)
            for _ in range(5):  # workers start, first epoch planned
                next(loader)
            start = time.perf_counter()
            tokens = sum(next(loader)["input_ids"].numel() for _ in range(batches))
            rates[name] = tokens / (time.perf_counter() - start)
        stream = on_the_fly_batches(tokenizer, block_size, batch_size)
        start = time.perf_counter()
        tokens = sum(next(stream)["input_ids"].numel() for _ in range(batches // 5))
        rates["tokenizing on the fly (before stores)"] = tokens / (time.perf_counter() - start)
    baseline = rates["tokenizing on the fly (before stores)"]
    for name, rate in rates.items():
        print(
            f"loader, block {block_size} x batch {batch_size}, {name}: {rate:,.0f} tokens/s "
            f"({rate / baseline:.1f}x on the fly)"
        )


def benchmark_prepare(copies: int = 3, repeats: int = 3, shard_rows: int = 250) -> None:
    """Preparing a store: documents/s with one worker and with one per core (interleaved,
    ``repeats`` times each, the best of each reported), on the three built-in training corpora
    (prose, PII prose and code) written ``copies`` times over."""
    from phf.data.corpus import split_source
    from phf.data.store import ensure_store
    from phf.tokenizer import load_tokenizer

    tokenizer = load_tokenizer("builtin")
    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "corpus"
        data.mkdir()
        rows = []
        for task in ("toxicity", "pii", "pep8"):
            source = split_source(task, "builtin", "train")
            rows += [payload for payload, _, _ in source.rows()]
        (data / "train.jsonl").write_bytes(b"".join(rows * copies))
        source = split_source("x", str(data), "train")
        rates: dict[int, float] = {}
        pairs: list[float] = []
        for attempt, workers in enumerate(sorted({1, cores}) * repeats):
            cache = Path(tmp) / f"cache{attempt}"
            start = time.perf_counter()
            store = ensure_store(source, tokenizer, cache, workers, shard_rows)
            seconds = time.perf_counter() - start
            shutil.rmtree(cache)
            rate = store.num_documents / seconds
            rates[workers] = max(rates.get(workers, 0.0), rate)
            pairs.append(rate)
            print(
                f"prepare, {store.num_documents} documents ({store.num_tokens / 1e6:.1f}M tokens), "
                f"{workers} worker(s): {rate:,.0f} documents/s, "
                f"{store.num_tokens / seconds / 1e6:.2f}M tokens/s ({seconds:.1f} s)"
            )
    if cores > 1:
        ratios = [b / a for a, b in zip(pairs[::2], pairs[1::2], strict=True)]
        print(
            f"prepare speed-up with {cores} workers: {rates[cores] / rates[1]:.2f}x best to best; "
            f"per interleaved pair {', '.join(f'{r:.2f}x' for r in ratios)} ({shard_rows} rows "
            "per shard)"
        )


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


STAGE_UNITS = {
    "sft": "tokens",
    "dpo": "pairs",
    "ppo": "episodes",
    "grpo": "episodes",
    "rloo": "episodes",
}


def benchmark_stage(objective: str, overrides: list[str], warmup: int, steps: int) -> None:
    """A finetuning stage's own step, as the training loop drives it: SFT tokens/s (prompt and
    response tokens of the examples), DPO preference pairs/s (policy forward and backward of
    both sides; the reference's log-probabilities are cached once before the first step), and
    for the online stages episodes/s of their iteration (generate, score, forward the policy
    and the reference, update) with the share of it spent generating."""
    cfg = compose_config([f"objective={objective}", *overrides])
    seed_everything(cfg.seed)
    placement = resolve_placement(cfg.hardware)
    training = STAGES[objective].build(cfg, placement, SINGLE_PROCESS)
    for _ in range(warmup):
        training.step()
    synchronize(placement.device)
    start, done_before = time.perf_counter(), training.progress
    generating = 0.0
    for _ in range(steps):
        step_start = time.perf_counter()
        metrics = training.step()
        share = metrics.get("time/generation_share", 0.0)
        generating += share * (time.perf_counter() - step_start)
    synchronize(placement.device)
    seconds = time.perf_counter() - start
    rate = (training.progress - done_before) / seconds
    settings = getattr(cfg, objective)
    if objective in ("sft", "dpo"):
        detail = f"batch {cfg.train.batch_size}, <= {settings.max_length} tokens each"
    else:
        reward = settings.reward_model or f"minus the {cfg.scorer.name} scorer"
        detail = (
            f"{settings.rollout_batch_size} episodes of <= {settings.response_length} tokens per "
            f"iteration; reward {reward}"
        )
        if objective == "ppo":
            detail += f"; {settings.ppo_epochs} epochs x "
            detail += f"{settings.rollout_batch_size // settings.mini_batch_size} minibatches"
        else:
            detail += f"; {settings.num_generations} per prompt"
    line = f"{objective}: {rate:,.1f} {STAGE_UNITS[objective]}/s"
    if objective not in ("sft", "dpo"):
        line += f", {generating / seconds:.0%} of the time generating"
    print(f"{line} ({steps} steps; {detail})")


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


def stage_rate(store: Path, metric: str) -> float:
    """The median of a run's logged ``metric`` (a rate per step window), its first window (the
    warm-up) left out."""
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{store}")
    (run,) = client.search_runs(client.search_experiments()[0].experiment_id)
    values = [
        m.value
        for m in sorted(client.get_metric_history(run.info.run_id, metric), key=lambda m: m.step)
    ][1:]
    return float(sorted(values)[len(values) // 2])


DATA_PARALLEL_STAGES = {"ppo": "time/episodes_per_s", "grpo": "time/episodes_per_s"}


def benchmark_data_parallel(overrides: list[str], steps: int, repeats: int) -> None:
    """PPO's and GRPO's episodes/s in one process against two (torchrun, gloo) on this
    machine's cores, as `phf` runs them: one process with every core's thread, or each of the
    processes with its share of the cores (interleaved, ``repeats`` pairs; the median of the
    steps' rates after the first)."""
    cores = os.cpu_count() or 1
    launchers = {
        1: ([sys.executable], cores),
        2: (
            [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2"],
            max(1, cores // 2),
        ),
    }
    for objective, metric in DATA_PARALLEL_STAGES.items():
        rates: dict[int, list[float]] = {1: [], 2: []}
        for _ in range(repeats):
            for processes, (launcher, threads) in launchers.items():
                with tempfile.TemporaryDirectory() as tmp:
                    command = [
                        *launcher,
                        "-m",
                        "phf.run",
                        f"objective={objective}",
                        f"hardware.num_threads={threads}",
                        f"train.max_steps={steps + 1}",
                        "train.log_steps=1",
                        f"train.eval_steps={steps + 100}",
                        f"train.save_steps={steps + 100}",
                        "eval.generation.num_samples=25",
                        "eval.kl_samples=8",
                        "tracking.log_model=false",
                        *overrides,
                        f"tracking.uri=sqlite:///{tmp}/mlflow.db",
                        f"hydra.run.dir={tmp}/run",
                    ]
                    subprocess.run(command, cwd=tmp, check=True, capture_output=True)
                    rates[processes].append(stage_rate(Path(tmp) / "mlflow.db", metric))
        ratios = [b / a for a, b in zip(rates[1], rates[2], strict=True)]
        print(
            f"data parallel {objective}: 1 process {', '.join(f'{r:.1f}' for r in rates[1])}, "
            f"2 processes {', '.join(f'{r:.1f}' for r in rates[2])} episodes/s: "
            f"{', '.join(f'{r:.2f}x' for r in ratios)} ({steps} iterations each, {cores} cores)"
        )


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
