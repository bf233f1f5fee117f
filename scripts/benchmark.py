"""Print phf's speed on this machine: training and generation tokens/s, each scorer's texts/s,
and the scoring pipeline's documents/s with one worker and with one per core.

Measures the default run's own code paths (the config is composed exactly as `python -m phf.run`
composes it, overrides included):

    python scripts/benchmark.py                       # everything, default tiny model
    python scripts/benchmark.py --only train generation hardware=gpu model=gpt2
    python scripts/benchmark.py --only scorers pipeline
"""

from __future__ import annotations

import argparse
import os
import sysconfig
import tempfile
import time
from itertools import islice
from pathlib import Path

import torch

from phf.config import compose_config
from phf.data.corpus import iter_documents
from phf.data.scoring import list_source_files, score_corpus
from phf.evaluation import generate_samples
from phf.hardware import resolve_placement
from phf.models import load_model_and_tokenizer
from phf.run import seed_everything
from phf.scorers import build_scorer
from phf.stages.pretrain import Training

SECTIONS = ["train", "generation", "scorers", "pipeline"]


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
    training = Training.build(cfg, placement)
    training.train()
    for _ in range(warmup):
        training.step()
    synchronize(placement.device)
    start, tokens_before = time.perf_counter(), training.tokens_seen
    for _ in range(steps):
        training.step()
    synchronize(placement.device)
    return (training.tokens_seen - tokens_before) / (time.perf_counter() - start)


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


if __name__ == "__main__":
    main()
