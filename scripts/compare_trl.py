"""Online RL speed against TRL, side by side: phf's GRPO, RLOO and PPO against TRL's GRPOTrainer
and RLOOTrainer (TRL 1.16) and PPOTrainer (TRL 1.12, its last release with PPO), on the same
policy, batch, response length, epochs and minibatches, interleaved (phf, TRL, phf, TRL, ...).

TRL is never a phf dependency: it lives in a virtualenv of its own, which this script drives
through ``--trl-python``. Set it up once:

    python3 -m venv /tmp/trlvenv
    /tmp/trlvenv/bin/pip install torch==2.13.0 trl==1.16.0 transformers==5.23.0 \\
        accelerate==1.15.0 datasets==5.2.0 alt-profanity-check==1.9.1 scikit-learn==1.9.1 \\
        joblib==1.6.0
    /tmp/trlvenv/bin/pip install --no-deps --target /tmp/trl112 trl==1.12.0

then, with an MLE model and a reward model of phf's (both from_pretrained directories):

    python scripts/compare_trl.py --policy outputs/toxicity/mle/<run>/model \\
        --reward-model outputs/toxicity/reward/<run>/model --trl-python /tmp/trlvenv/bin/python \\
        --trl112 /tmp/trl112 --repeats 2

Matched settings: 64 episodes per iteration of exactly 64 generated tokens each (no stop token,
so both sides generate the same amount), unconditional prompts (EOS), one micro-batch per
minibatch, the same allocator settings (phf/launch.py's) for both. GRPO: 8 prompts x 8
generations, one update per iteration, beta 0.04; RLOO: 16 prompts x 4, one update, KL coefficient
0.05; PPO: 4 epochs x 4 minibatches of 16, against the reward model. Rewards: minus
alt-profanity-check's probability (GRPO, RLOO), the reward model (PPO). Each run times
``--iterations`` iterations after one warm-up iteration, in episodes per second.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

BATCH, RESPONSE, GROUP_GRPO, GROUP_RLOO = 64, 64, 8, 4
MALLOC = "glibc.malloc.mmap_threshold=4294967296:glibc.malloc.trim_threshold=68719476736"


def phf_worker(args: argparse.Namespace) -> float:
    """phf's own stage, driven as the training loop drives it; episodes/s."""
    from phf.config import compose_config
    from phf.distributed import SINGLE_PROCESS
    from phf.hardware import resolve_placement
    from phf.run import STAGES, seed_everything

    m = args.method
    overrides = [
        f"objective={m}",
        "hardware=cpu",
        f"hardware.micro_batch_size={BATCH}",
        f"model.pretrained={args.policy}",
        f"{m}.rollout_batch_size={BATCH}",
        f"{m}.response_length={RESPONSE}",
        f"{m}.min_response_length=0",
        f"{m}.stop_token=null",
        f"{m}.normalize_reward=false",
        "eval.kl_samples=25",
        "eval.generation.num_samples=25",
    ]
    if m == "grpo":
        overrides += [
            f"grpo.num_generations={GROUP_GRPO}",
            "grpo.beta=0.04",
            "grpo.num_iterations=1",
        ]
    elif m == "rloo":
        overrides += [
            f"rloo.num_generations={GROUP_RLOO}",
            "rloo.kl_coef=0.05",
            "rloo.num_iterations=1",
        ]
    else:
        overrides += [
            f"ppo.reward_model={args.reward_model}",
            "ppo.mini_batch_size=16",
            "ppo.ppo_epochs=4",
            "hardware.micro_batch_size=16",
        ]
    cfg = compose_config(overrides)
    seed_everything(0)
    stage = STAGES[m].build(cfg, resolve_placement(cfg.hardware), SINGLE_PROCESS)
    stage.step()  # warm-up
    start = time.perf_counter()
    for _ in range(args.iterations):
        stage.step()
    return BATCH * args.iterations / (time.perf_counter() - start)


def trl_worker(args: argparse.Namespace) -> float:
    """TRL's trainer on the same settings; episodes/s from its step timestamps."""
    import datasets
    import torch
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        AutoTokenizer,
        TrainerCallback,
    )

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(args.policy)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    stamps: list[float] = []

    class Stamps(TrainerCallback):
        def on_step_end(self, *a, **k):
            stamps.append(time.perf_counter())

    steps = args.iterations + 1
    common = {
        "output_dir": args.scratch,
        "report_to": [],
        "use_cpu": True,
        "save_strategy": "no",
        "logging_steps": 1000,
        "seed": 0,
    }
    if args.method in ("grpo", "rloo"):
        from profanity_check import predict_prob

        def reward(completions: list[str], **_: object) -> list[float]:
            return [-float(p) for p in predict_prob(list(completions))]

        group = GROUP_GRPO if args.method == "grpo" else GROUP_RLOO
        prompts = datasets.Dataset.from_dict(
            {"prompt": [tokenizer.eos_token] * (BATCH // group * steps)}
        )
        settings = dict(
            per_device_train_batch_size=BATCH,
            num_generations=group,
            steps_per_generation=1,
            gradient_accumulation_steps=1,
            num_iterations=1,
            max_completion_length=RESPONSE,
            generation_kwargs={"min_new_tokens": RESPONSE},
            max_steps=steps,
            learning_rate=2e-4,
            **common,
        )
        if args.method == "grpo":
            from trl import GRPOConfig, GRPOTrainer

            config, trainer_class = GRPOConfig(beta=0.04, loss_type="grpo", **settings), GRPOTrainer
        else:
            from trl import RLOOConfig, RLOOTrainer

            config, trainer_class = RLOOConfig(beta=0.05, **settings), RLOOTrainer
        trainer = trainer_class(
            model=AutoModelForCausalLM.from_pretrained(args.policy),
            reward_funcs=[reward],
            args=config,
            train_dataset=prompts,
            processing_class=tokenizer,
            callbacks=[Stamps()],
        )
    else:
        from trl.experimental.ppo import PPOConfig, PPOTrainer

        prompts = datasets.Dataset.from_dict(
            {"input_ids": [[tokenizer.eos_token_id]] * (BATCH * steps)}
        )
        # TRL's PPO batch is per_device_train_batch_size x gradient_accumulation_steps (64
        # episodes per rollout), cut into num_mini_batches minibatches (4 of 16), each one
        # micro-batch of per_device_train_batch_size (16): phf's settings above.
        config = PPOConfig(
            per_device_train_batch_size=16,
            gradient_accumulation_steps=BATCH // 16,
            num_mini_batches=4,
            num_ppo_epochs=4,
            response_length=RESPONSE,
            stop_token=None,
            total_episodes=BATCH * steps,
            local_rollout_forward_batch_size=BATCH,
            num_sample_generations=0,
            learning_rate=2e-4,
            kl_coef=0.05,
            **common,
        )
        value = AutoModelForSequenceClassification.from_pretrained(args.policy, num_labels=1)
        value.config.pad_token_id = tokenizer.pad_token_id
        trainer = PPOTrainer(
            args=config,
            processing_class=tokenizer,
            model=AutoModelForCausalLM.from_pretrained(args.policy),
            ref_model=AutoModelForCausalLM.from_pretrained(args.policy),
            reward_model=AutoModelForSequenceClassification.from_pretrained(args.reward_model),
            value_model=value,
            train_dataset=prompts,
            callbacks=[Stamps()],
        )
    trainer.train()
    timed = stamps[-args.iterations - 1 :]  # once per iteration: after the warm-up one
    return BATCH * args.iterations / (timed[-1] - timed[0])


def drive(args: argparse.Namespace) -> None:
    env = {
        **os.environ,
        "GLIBC_TUNABLES": MALLOC,
        "PHF_MALLOC_TUNED": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    results: dict[tuple[str, str], list[float]] = {}
    for method in args.methods:
        trl_env = dict(env)
        if method == "ppo":
            trl_env["PYTHONPATH"] = args.trl112
        for _ in range(args.repeats):
            for side, python, side_env in (
                ("phf", sys.executable, env),
                ("trl", args.trl_python, trl_env),
            ):
                command = [
                    python,
                    __file__,
                    "--worker",
                    side,
                    "--method",
                    method,
                    "--policy",
                    args.policy,
                    "--reward-model",
                    args.reward_model,
                    "--iterations",
                    str(args.iterations),
                    "--scratch",
                    args.scratch,
                ]
                done = subprocess.run(command, env=side_env, capture_output=True, text=True)
                if done.returncode != 0:
                    raise SystemExit(f"{side} {method} failed:\n{done.stderr[-3000:]}")
                rate = json.loads(done.stdout.strip().splitlines()[-1])["episodes_per_s"]
                results.setdefault((method, side), []).append(rate)
                print(f"{method} {side}: {rate:.2f} episodes/s", flush=True)
    print("\n| method | phf episodes/s | TRL episodes/s | phf / TRL (median of pairs) |")
    print("|---|---|---|---|")
    for method in args.methods:
        phf, trl = results[(method, "phf")], results[(method, "trl")]
        ratios = [a / b for a, b in zip(phf, trl, strict=True)]
        version = "1.12.0" if method == "ppo" else "1.16.0"
        print(
            f"| {method} (TRL {version}) | {', '.join(f'{r:.2f}' for r in phf)} | "
            f"{', '.join(f'{r:.2f}' for r in trl)} | {statistics.median(ratios):.2f}x "
            f"({', '.join(f'{r:.2f}' for r in ratios)}) |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--policy", required=True)
    parser.add_argument("--reward-model", default="")
    parser.add_argument("--trl-python", default="/tmp/trlvenv/bin/python")
    parser.add_argument("--trl112", default="/tmp/trl112")
    parser.add_argument("--methods", nargs="+", default=["grpo", "rloo", "ppo"])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--iterations", type=int, default=4)
    parser.add_argument("--scratch", default="/tmp/compare_trl")
    parser.add_argument("--worker", choices=["phf", "trl"], default=None)
    parser.add_argument("--method", default=None)
    args = parser.parse_args()
    if args.worker is None:
        drive(args)
        return
    rate = phf_worker(args) if args.worker == "phf" else trl_worker(args)
    print(json.dumps({"episodes_per_s": rate}))


if __name__ == "__main__":
    main()
