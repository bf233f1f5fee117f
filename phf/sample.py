"""Sample from any model with a task's evaluation settings, and score the samples.

    python -m phf.sample runs:/<run id>/model                      # the default task, 100 samples
    python -m phf.sample runs:/<id>/model task=pii eval.generation.num_samples=500
    python -m phf.sample outputs/.../model eval.kl_reference=runs:/<mle run id>/model --out s.jsonl

MODEL is what ``model.pretrained`` takes (an MLflow model URI, a path, a hub id); the overrides
are the run's (task, scorer, ``eval.*``, ``hardware``, ``tracking.uri`` to read runs:/ URIs from a
server). Prints the evaluation's metrics (score, score_max_at_25, hit_rate, held-out LM loss, KL
when eval.kl_reference is set) as JSON and a few samples, and writes every sample with ``--out``.
The same code evaluates every run, so its numbers compare with a run's own.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from omegaconf import OmegaConf

from phf.config import compose_config, validate_config
from phf.hardware import resolve_placement
from phf.models import load_model_and_tokenizer
from phf.run import seed_everything
from phf.stages.common import build_evaluator, load_kl_reference


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m phf.sample", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("model", help="runs:/<run id>/model, a path or a hub id")
    parser.add_argument("overrides", nargs="*", help="config overrides, as for phf.run")
    parser.add_argument("--out", type=Path, default=None, help="write every sample here (jsonl)")
    parser.add_argument("--show", type=int, default=5, help="samples printed per scenario")
    args = parser.parse_args(argv)

    cfg = compose_config([*args.overrides, f"model.pretrained={args.model}"])
    OmegaConf.update(cfg, "model.tokenizer", None, force_add=False)  # the model's own
    # Every sample in the tables (and in --out), not the run's first 100.
    OmegaConf.update(cfg, "eval.samples_table_rows", cfg.eval.generation.num_samples)
    validate_config(cfg)
    if cfg.tracking.uri:
        import mlflow

        mlflow.set_tracking_uri(cfg.tracking.uri)
    seed_everything(cfg.seed)
    placement = resolve_placement(cfg.hardware)
    model, tokenizer = load_model_and_tokenizer(cfg.model, cfg.train.block_size)
    model.to(placement.device).eval()
    evaluator = build_evaluator(
        cfg, tokenizer, placement, load_kl_reference(cfg, tokenizer, placement)
    )
    metrics, tables = evaluator.evaluate(model)
    print(json.dumps(metrics, indent=1, sort_keys=True))
    for name, table in tables.items():
        print(f"\n{name}:")
        for prompt, completion, score in list(
            zip(table["prompt"], table["completion"], table["score"], strict=True)
        )[: args.show]:
            print(f"  [{score:.3f}] {prompt!r} -> {completion!r}")
    if args.out is not None:
        with open(args.out, "w", encoding="utf-8") as f:
            for name, table in tables.items():
                for key, prompt, completion, score in zip(
                    table["sample"],
                    table["prompt"],
                    table["completion"],
                    table["score"],
                    strict=True,
                ):
                    f.write(
                        json.dumps(
                            {
                                "scenario": name,
                                "sample": key,
                                "prompt": prompt,
                                "completion": completion,
                                "score": score,
                            }
                        )
                        + "\n"
                    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
