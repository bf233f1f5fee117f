"""Print phf's speed on this machine: training tokens/s, generation tokens/s, scorer texts/s.

Measures the default run's own code paths (the config is composed exactly as `python -m phf.run`
composes it, overrides included):

    python scripts/benchmark.py                       # the default tiny model on this machine
    python scripts/benchmark.py hardware=gpu model=gpt2
"""

from __future__ import annotations

import argparse
import math
import time
from itertools import islice

import torch

from phf.config import compose_config
from phf.data.corpus import iter_documents
from phf.data.packing import batches, pack_blocks
from phf.evaluation import generate_samples
from phf.hardware import resolve_placement
from phf.models import build_model, build_tokenizer
from phf.objectives import build_objective
from phf.run import seed_everything
from phf.scorers import build_scorer
from phf.stages.pretrain import accumulate_gradients, optimizer_groups


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=10, help="timed optimizer steps")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, as for phf.run")
    args = parser.parse_args()

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

    model.train()
    for index, batch in enumerate(train_batches):
        if index == args.warmup:
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
    train_tokens = args.steps * cfg.train.batch_size * cfg.train.block_size
    print(
        f"training:   {train_tokens / train_seconds:,.0f} tokens/s "
        f"(batch {cfg.train.batch_size} x {cfg.train.block_size}, "
        f"micro-batch {cfg.hardware.micro_batch_size})"
    )

    generation = cfg.eval.generation
    generate_samples(model, tokenizer, generation, placement, seed=0)  # warm-up
    samples = generate_samples(model, tokenizer, generation, placement, seed=1)
    print(
        f"generation: {sum(samples.lengths) / samples.seconds:,.0f} tokens/s, "
        f"{len(samples.lengths) / samples.seconds:.1f} samples/s "
        f"({generation.num_samples} samples of <= {generation.max_new_tokens} tokens, "
        f"batch {generation.batch_size}, KV cache)"
    )

    scorer = build_scorer(cfg.scorer)
    texts = [text for doc in islice(documents, 2000) for text in doc.texts]
    start = time.perf_counter()
    scorer.score_texts(texts)
    print(f"scorer {cfg.scorer.name}: {len(texts) / (time.perf_counter() - start):,.0f} texts/s")


if __name__ == "__main__":
    main()
