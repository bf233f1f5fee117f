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
import math
import os
import sysconfig
import tempfile
import time
from itertools import islice
from pathlib import Path

import torch

from phf.config import compose_config
from phf.data.corpus import iter_documents
from phf.data.packing import batches, pack_blocks
from phf.data.scoring import list_source_files, score_corpus
from phf.evaluation import generate_samples
from phf.hardware import resolve_placement
from phf.models import build_model, build_tokenizer
from phf.objectives import build_objective
from phf.run import seed_everything
from phf.scorers import build_scorer
from phf.stages.pretrain import accumulate_gradients, optimizer_groups

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
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, as for phf.run")
    args = parser.parse_args()
    if "train" in args.only or "generation" in args.only:
        benchmark_model(args)
    if "scorers" in args.only:
        benchmark_scorers()
    if "pipeline" in args.only:
        benchmark_pipeline(args.pipeline_files)


def benchmark_model(args: argparse.Namespace) -> None:

    cfg = compose_config(args.overrides)
    seed_everything(cfg.seed)
    placement = resolve_placement(cfg.hardware)
    tokenizer = build_tokenizer(cfg.model)
    model = build_model(cfg.model, tokenizer, cfg.train.block_size).to(placement.device)
    objective = build_objective(cfg.objective)
    optimizer = torch.optim.AdamW(optimizer_groups(model, cfg.train.weight_decay), lr=cfg.train.lr)
    scaler = placement.grad_scaler()
    micro_batches = math.ceil(cfg.train.batch_size / cfg.hardware.micro_batch_size)
    documents = iter_documents(cfg.task.name, cfg.task.dataset, cfg.task.train_split)
    blocks = pack_blocks(documents, tokenizer, cfg.train.block_size)
    train_batches = list(islice(batches(blocks, cfg.train.batch_size), args.warmup + args.steps))
    print(
        f"device {placement.device} ({placement.precision}), {torch.get_num_threads()} threads, "
        f"model {cfg.model.name} {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params, "
        f"objective {cfg.objective.name}"
    )

    if "train" in args.only:
        benchmark_training(
            cfg,
            model,
            objective,
            optimizer,
            scaler,
            micro_batches,
            placement,
            train_batches,
            args.warmup,
        )
    if "generation" in args.only:
        benchmark_generation(cfg, model, tokenizer, placement)


def benchmark_training(
    cfg, model, objective, optimizer, scaler, micro_batches, placement, train_batches, warmup: int
) -> None:
    model.train()
    for index, batch in enumerate(train_batches):
        if index == warmup:
            synchronize(placement.device)
            start = time.perf_counter()
        input_ids = batch["input_ids"].to(placement.device)
        token_scores = batch["token_scores"].to(placement.device)
        accumulate_gradients(
            model, objective, input_ids, token_scores, micro_batches, placement, scaler
        )
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.max_grad_norm)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
    synchronize(placement.device)
    train_seconds = time.perf_counter() - start
    train_tokens = (len(train_batches) - warmup) * cfg.train.batch_size * cfg.train.block_size
    print(
        f"training:   {train_tokens / train_seconds:,.0f} tokens/s "
        f"(batch {cfg.train.batch_size} x {cfg.train.block_size}, "
        f"micro-batch {cfg.hardware.micro_batch_size})"
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
