"""The PPO stage (objective=ppo): fine-tune a policy against a reward, with a KL penalty to the
policy it started from.

The policy is model.pretrained (a hub id, a path, or runs:/<id>/model of a pretraining run) with
a zero-initialised value head on its last hidden state: one trunk for both, as in Ziegler et al.
2019's shared-trunk variant and TRL's value-head models (half the memory and forward passes of a
separate value model). The frozen reference is a copy of the initial policy. The reward is a
reward model's normalised output (ppo.reward_model) or, with none, minus the task's scorer.

Each iteration: generate ``rollout_batch_size`` responses (the *generation* share of the time),
score them, compute log-probabilities, values and per-token rewards with the KL penalty, GAE,
then ``ppo_epochs`` passes of clipped policy and value updates over minibatches.
"""

from __future__ import annotations

import copy
import logging
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from transformers import PreTrainedModel, PreTrainedTokenizerBase, get_scheduler

from phf.checkpoints import save_pretrained
from phf.data.prompts import scenario_prompts
from phf.evaluation import left_padded_prompts
from phf.hardware import Placement, resolve_placement
from phf.models import Network, ValueHead, load_model_and_tokenizer, position_ids, save_value_head
from phf.ppo import (
    AdaptiveKLController,
    FixedKLController,
    entropy_from_logits,
    gae,
    masked_whiten,
    policy_loss,
    token_rewards,
    value_loss,
)
from phf.reward_model import RewardModel, score_texts
from phf.scorers import build_scorer
from phf.stages.common import (
    build_evaluator,
    load_kl_reference,
    publish_model,
    sample_kl_reference,
)
from phf.stages.pretrain import optimizer_groups
from phf.tracking import Tracker

log = logging.getLogger(__name__)

RewardFunction = Callable[[Sequence[str], Sequence[str]], torch.Tensor]


def build_reward_function(cfg: DictConfig, placement: Placement) -> tuple[RewardFunction, str]:
    """(prompts, responses) -> rewards [n], and a description. A reward model reads text with
    its own tokenizer, so a policy with another tokenizer is fine (decoded, then re-encoded)."""
    if cfg.ppo.reward_model is not None:
        model, tokenizer = RewardModel.load(cfg.ppo.reward_model)
        model.to(placement.device).requires_grad_(False)

        def reward_model_rewards(prompts: Sequence[str], responses: Sequence[str]) -> torch.Tensor:
            return score_texts(model, tokenizer, prompts, responses, cfg.eval.batch_size, placement)

        return reward_model_rewards, f"reward model {cfg.ppo.reward_model}"
    scorer = build_scorer(cfg.scorer)

    def scorer_rewards(prompts: Sequence[str], responses: Sequence[str]) -> torch.Tensor:
        texts = (
            [p + r for p, r in zip(prompts, responses, strict=True)]
            if cfg.ppo.score_prompt
            else list(responses)
        )
        return -torch.tensor(scorer.score_texts(texts), dtype=torch.float32)

    return scorer_rewards, f"-{cfg.scorer.name} score"


def stop_token_id(stop_token: str | None, tokenizer: PreTrainedTokenizerBase) -> int | None:
    if stop_token is None:
        return None
    if stop_token == "eos":
        return tokenizer.eos_token_id
    ids = tokenizer.encode(stop_token, add_special_tokens=False)
    if len(ids) != 1:
        raise ValueError(
            f"ppo.stop_token={stop_token!r} is {len(ids)} tokens for this tokenizer; it must be "
            "exactly one token (or eos, or null for fixed-length responses)"
        )
    return ids[0]


def response_mask(
    responses: torch.Tensor, stop_id: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """1 on each response's tokens up to and including its first stop token, 0 after (the pad
    that generation appends, possibly the same id as EOS); and whether each found its stop."""
    if stop_id is None:
        ones = torch.ones_like(responses, dtype=torch.float32)
        return ones, torch.ones(responses.size(0), dtype=torch.bool, device=responses.device)
    is_stop = responses == stop_id
    # Positions strictly after the first stop token: a stop before them.
    after_stop = (is_stop.long().cumsum(dim=1) - is_stop.long()) > 0
    return (~after_stop).float(), is_stop.any(dim=1)


def forward_response(
    model: PreTrainedModel,
    value_head: ValueHead | None,
    query_ids: torch.Tensor,
    query_mask: torch.Tensor,
    response_ids: torch.Tensor,
    mask: torch.Tensor,
    temperature: float,
    placement: Placement,
    stop_id: int | None = None,
    min_length: int = 0,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Log-probabilities [n, R] of the response tokens under the distribution they were sampled
    from (at the sampling temperature, the stop token banned from the first ``min_length``
    positions), the values of the states they were sampled from, and those positions' logits."""
    input_ids = torch.cat([query_ids, response_ids], dim=1)
    attention_mask = torch.cat([query_mask, mask.long()], dim=1)
    with placement.autocast():
        output = model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids(attention_mask),
            output_hidden_states=value_head is not None,
        )
    start = query_ids.size(1) - 1  # the position that predicts the first response token
    logits = output.logits[:, start:-1].float() / temperature
    if stop_id is not None and min_length > 0:
        logits[:, :min_length, stop_id] = float("-inf")
    logprobs = torch.log_softmax(logits, dim=-1).gather(-1, response_ids[..., None]).squeeze(-1)
    values = None
    if value_head is not None:
        values = value_head(output.hidden_states[-1][:, start:-1]).float()
    return logprobs, values, logits


@dataclass
class Responses:
    query_ids: torch.Tensor  # [n, Q], left-padded EOS + prompt
    query_mask: torch.Tensor
    response_ids: torch.Tensor  # [n, R], right-padded
    mask: torch.Tensor  # [n, R] float
    found_stop: torch.Tensor  # [n] bool
    texts: list[str]  # without the stop token
    seconds: float


@dataclass
class Rollout:
    """One rollout batch: the generated responses and what PPO computes on them."""

    prompts: list[str]
    generated: Responses
    logprobs: torch.Tensor  # [n, R] under the policy that generated them
    ref_logprobs: torch.Tensor
    values: torch.Tensor
    entropy: torch.Tensor  # [n, R]
    scores: torch.Tensor  # [n] the reward function's, before the missing-stop penalty


@torch.no_grad()
def generate_responses(
    policy: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    stop_id: int | None,
    ppo: DictConfig,
    placement: Placement,
) -> Responses:
    """One sampled response per prompt, from the policy itself (no top-p: PPO's probability
    ratios need samples of the distribution they are computed under)."""
    was_training = policy.training
    policy.eval()
    start = time.perf_counter()
    query_ids, query_mask = left_padded_prompts(prompts, tokenizer, placement.device)
    with placement.autocast():
        output = policy.generate(
            input_ids=query_ids,
            attention_mask=query_mask,
            do_sample=True,
            temperature=ppo.temperature,
            top_k=0,
            top_p=1.0,
            max_new_tokens=ppo.response_length,
            # No stop token: fixed-length responses (EOS is not sampled). Otherwise the stop
            # token is banned for the first min_response_length tokens.
            min_new_tokens=ppo.response_length if stop_id is None else ppo.min_response_length,
            eos_token_id=stop_id if stop_id is not None else tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            use_cache=True,
        )
    seconds = time.perf_counter() - start
    policy.train(was_training)
    response_ids = output[:, query_ids.size(1) :]
    mask, found_stop = response_mask(response_ids, stop_id)
    texts = []
    for row, row_mask in zip(response_ids.tolist(), mask.tolist(), strict=True):
        kept = [t for t, m in zip(row, row_mask, strict=True) if m and t != stop_id]
        texts.append(tokenizer.decode(kept, skip_special_tokens=True))
    return Responses(query_ids, query_mask, response_ids, mask, found_stop, texts, seconds)


def normalized_reward(
    reward_fn: RewardFunction,
    policy: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompt_pool: list[str],
    stop_id: int | None,
    cfg: DictConfig,
    placement: Placement,
    rng: random.Random,
) -> tuple[RewardFunction, float, float]:
    """``reward_fn`` with the gain and bias that give rewards of mean 0 and std 1 on
    ``ppo.normalization_episodes`` samples of the initial policy (what objective=reward does for
    reward models), so that ppo.kl_coef means the same for every scorer's range."""
    ppo = cfg.ppo
    raw = []
    for first in range(0, ppo.normalization_episodes, ppo.rollout_batch_size):
        count = min(ppo.rollout_batch_size, ppo.normalization_episodes - first)
        prompts = [rng.choice(prompt_pool) for _ in range(count)]
        responses = generate_responses(policy, tokenizer, prompts, stop_id, ppo, placement)
        raw.append(torch.nan_to_num(reward_fn(prompts, responses.texts), nan=0.0))
    rewards = torch.cat(raw)
    std = max(float(rewards.std()), 1e-6)
    gain, bias = 1.0 / std, -float(rewards.mean()) / std

    def rewards_normalized(prompts: Sequence[str], responses: Sequence[str]) -> torch.Tensor:
        return gain * reward_fn(prompts, responses) + bias

    return rewards_normalized, gain, bias


def collect_rollout(
    policy: PreTrainedModel,
    value_head: ValueHead,
    reference: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    reward_fn: RewardFunction,
    stop_id: int | None,
    ppo: DictConfig,
    placement: Placement,
) -> Rollout:
    generated = generate_responses(policy, tokenizer, prompts, stop_id, ppo, placement)
    batch = (generated.query_ids, generated.query_mask, generated.response_ids, generated.mask)
    constraint = (ppo.temperature, placement, stop_id, ppo.min_response_length)
    policy.eval()
    with torch.no_grad():
        scores = reward_fn(prompts, generated.texts).to(placement.device)
        logprobs, values, logits = forward_response(policy, value_head, *batch, *constraint)
        ref_logprobs, _, _ = forward_response(reference, None, *batch, *constraint)
    policy.train()
    return Rollout(
        prompts=prompts,
        generated=generated,
        logprobs=logprobs,
        ref_logprobs=ref_logprobs,
        values=values,
        entropy=entropy_from_logits(logits) * generated.mask,
        scores=scores,
    )


def rollout_prompts(cfg: DictConfig) -> list[str]:
    """The pool of rollout prompts (ppo.prompts, as an evaluation scenario's)."""
    scenario = OmegaConf.create({"prompts": cfg.ppo.prompts, "score_prompt": cfg.ppo.score_prompt})
    # Enough distinct prompts for many rollouts; a pool of "" when there are none.
    return scenario_prompts(scenario, cfg.task, max(cfg.ppo.rollout_batch_size, 1000))


@dataclass
class PPOTraining:
    """What one PPO iteration touches: policy and value head, frozen reference, reward, prompts,
    optimizer and KL controller. Built by ``PPOTraining.build``; ``iteration()`` collects one
    rollout batch and updates on it. The stage's loop and scripts/benchmark.py both drive it."""

    cfg: DictConfig
    placement: Placement
    policy: PreTrainedModel
    value_head: ValueHead
    network: Network
    reference: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    reward_fn: RewardFunction
    reward_source: str
    stop_id: int | None
    prompt_pool: list[str]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    kl_controller: FixedKLController | AdaptiveKLController
    num_rollouts: int
    rng: random.Random
    episodes: int = 0

    @classmethod
    def build(cls, cfg: DictConfig, placement: Placement) -> PPOTraining:
        ppo, train = cfg.ppo, cfg.train
        if ppo.rollout_batch_size % ppo.mini_batch_size:
            raise ValueError(
                f"ppo.rollout_batch_size={ppo.rollout_batch_size} must be a multiple of "
                f"ppo.mini_batch_size={ppo.mini_batch_size}"
            )
        if ppo.min_response_length > ppo.response_length:
            raise ValueError(
                f"ppo.min_response_length={ppo.min_response_length} exceeds "
                f"ppo.response_length={ppo.response_length}; lower it (0 lets the stop token "
                "end a response anywhere)"
            )
        if cfg.model.pretrained is None:
            log.warning(
                "model.pretrained is null: PPO starts from a randomly initialised model; set it "
                "to a pretrained model, e.g. runs:/<run id>/model of an objective=mle run"
            )
        pool = rollout_prompts(cfg)
        policy, tokenizer = load_model_and_tokenizer(cfg.model, train.block_size)
        longest_query = 1 + max(len(tokenizer.encode(p, add_special_tokens=False)) for p in pool)
        positions = getattr(policy.config, "n_positions", None)
        if positions is not None and longest_query + ppo.response_length > positions:
            raise ValueError(
                f"prompts of up to {longest_query} tokens + ppo.response_length="
                f"{ppo.response_length} exceed the model's {positions} positions; lower "
                "ppo.response_length or use shorter prompts"
            )
        policy.to(placement.device)
        value_head = ValueHead(policy.config.hidden_size).to(placement.device)
        network = Network(policy, value_head)
        reference = copy.deepcopy(policy).eval().requires_grad_(False)
        reward_fn, reward_source = build_reward_function(cfg, placement)
        stop_id = stop_token_id(ppo.stop_token, tokenizer)
        rng = random.Random(cfg.seed)
        if ppo.reward_model is None and ppo.normalize_scorer_reward:
            reward_fn, gain, bias = normalized_reward(
                reward_fn, policy, tokenizer, pool, stop_id, cfg, placement, rng
            )
            reward_source += (
                f", normalised on {ppo.normalization_episodes} samples of the initial policy "
                f"(gain {gain:.3f}, bias {bias:+.3f})"
            )
        num_rollouts = train.max_steps or math.ceil(ppo.total_episodes / ppo.rollout_batch_size)
        optimizer_steps = (
            num_rollouts * ppo.ppo_epochs * (ppo.rollout_batch_size // ppo.mini_batch_size)
        )
        optimizer = torch.optim.AdamW(
            optimizer_groups(network, train.weight_decay),
            lr=train.lr,
            betas=tuple(train.adam_betas),
            eps=1e-5,
        )
        scheduler = get_scheduler(
            train.lr_scheduler,
            optimizer,
            num_warmup_steps=round(train.warmup_ratio * optimizer_steps),
            num_training_steps=optimizer_steps,
        )
        kl_controller = (
            AdaptiveKLController(ppo.kl_coef, ppo.target_kl, ppo.kl_horizon)
            if ppo.adaptive_kl
            else FixedKLController(ppo.kl_coef)
        )
        return cls(
            cfg=cfg,
            placement=placement,
            policy=policy,
            value_head=value_head,
            network=network,
            reference=reference,
            tokenizer=tokenizer,
            reward_fn=reward_fn,
            reward_source=reward_source,
            stop_id=stop_id,
            prompt_pool=pool,
            optimizer=optimizer,
            scheduler=scheduler,
            kl_controller=kl_controller,
            num_rollouts=num_rollouts,
            rng=rng,
        )

    def iteration(self) -> tuple[Rollout, dict[str, float]]:
        """Generate and score one rollout batch, then ``ppo_epochs`` passes of minibatch updates;
        returns the rollout and the iteration's metrics (the ecosystem's names)."""
        ppo, placement = self.cfg.ppo, self.placement
        start = time.perf_counter()
        prompts = [self.rng.choice(self.prompt_pool) for _ in range(ppo.rollout_batch_size)]
        rollout = collect_rollout(
            self.policy,
            self.value_head,
            self.reference,
            self.tokenizer,
            prompts,
            self.reward_fn,
            self.stop_id,
            ppo,
            placement,
        )
        mask = rollout.generated.mask
        scores = torch.nan_to_num(rollout.scores, nan=0.0)  # an unscorable text earns nothing
        if ppo.missing_stop_penalty is not None:
            scores = torch.where(
                rollout.generated.found_stop, scores, scores - ppo.missing_stop_penalty
            )
        kl_coef = self.kl_controller.value
        rewards, kl = token_rewards(rollout.logprobs, rollout.ref_logprobs, scores, mask, kl_coef)
        if ppo.whiten_rewards:
            rewards = masked_whiten(rewards, mask, shift_mean=False)
        advantages, returns = gae(rewards, rollout.values, mask, ppo.gamma, ppo.lam)
        advantages = masked_whiten(advantages, mask)

        sums: dict[str, float] = {}
        updates = 0
        micro = self.cfg.hardware.micro_batch_size
        for _ in range(ppo.ppo_epochs):
            order = torch.randperm(ppo.rollout_batch_size)
            for minibatch in order.split(ppo.mini_batch_size):
                for piece in minibatch.split(micro):
                    share = len(piece) / len(minibatch)
                    piece_metrics = self._update_piece(rollout, advantages, returns, piece, share)
                    for name, value in piece_metrics.items():
                        sums[name] = sums.get(name, 0.0) + float(value) * share
                torch.nn.utils.clip_grad_norm_(
                    self.network.parameters(), self.cfg.train.max_grad_norm
                )
                self.optimizer.step()
                self.scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
                updates += 1

        self.episodes += ppo.rollout_batch_size
        kl_per_episode = kl.sum(dim=1)
        mean_kl = float(kl_per_episode.mean())
        self.kl_controller.update(mean_kl, ppo.rollout_batch_size)
        seconds = time.perf_counter() - start
        non_score_reward = float((-kl_coef * kl_per_episode).mean())
        return rollout, {name: value / updates for name, value in sums.items()} | {
            "objective/kl": mean_kl,
            "objective/entropy": float(rollout.entropy.sum(dim=1).mean()),
            "objective/scores": float(scores.mean()),
            "objective/non_score_reward": non_score_reward,
            "objective/rlhf_reward": float(scores.mean()) + non_score_reward,
            "objective/kl_coef": kl_coef,
            "val/response_length": float(mask.sum(dim=1).mean()),
            "val/stop_fraction": float(rollout.generated.found_stop.float().mean()),
            "train/lr": self.scheduler.get_last_lr()[0],
            "time/episodes_per_s": ppo.rollout_batch_size / seconds,
            "time/generation_share": rollout.generated.seconds / seconds,
        }

    def _update_piece(
        self,
        rollout: Rollout,
        advantages: torch.Tensor,
        returns: torch.Tensor,
        piece: torch.Tensor,
        share: float,
    ) -> dict[str, torch.Tensor]:
        """Forward and backward one micro-batch of a minibatch (weighed by its ``share``)."""
        ppo = self.cfg.ppo
        generated = rollout.generated
        mask = generated.mask[piece]
        logprobs, values, _ = forward_response(
            self.policy,
            self.value_head,
            generated.query_ids[piece],
            generated.query_mask[piece],
            generated.response_ids[piece],
            mask,
            ppo.temperature,
            self.placement,
            self.stop_id,
            ppo.min_response_length,
        )
        pg_loss, pg_metrics = policy_loss(
            logprobs, rollout.logprobs[piece], advantages[piece], mask, ppo.cliprange
        )
        vf_loss, vf_metrics = value_loss(
            values, rollout.values[piece], returns[piece], mask, ppo.cliprange_value
        )
        ((pg_loss + ppo.vf_coef * vf_loss) * share).backward()
        return {
            "policy/approxkl": pg_metrics["approxkl"],
            "policy/clipfrac": pg_metrics["clipfrac"],
            "val/ratio": pg_metrics["ratio"],
            "val/clipfrac": vf_metrics["clipfrac"],
            "loss/policy": pg_loss.detach(),
            "loss/value": vf_loss.detach(),
        }

    def save(self, directory: Path) -> None:
        """The policy (``from_pretrained``-loadable), tokenizer, config and value head."""
        save_pretrained(directory, self.policy, self.tokenizer, self.cfg)
        save_value_head(self.value_head, directory)


def run_ppo(cfg: DictConfig, tracker: Tracker, output_dir: Path) -> float:
    ppo = cfg.ppo
    placement = resolve_placement(cfg.hardware)
    training = PPOTraining.build(cfg, placement)
    policy, tokenizer = training.policy, training.tokenizer
    # KL from the initial policy (the frozen reference) unless eval.kl_reference names another.
    kl_reference = (
        load_kl_reference(cfg, tokenizer, placement)
        if cfg.eval.kl_reference is not None
        else sample_kl_reference(training.reference, tokenizer, cfg, placement)
    )
    evaluator = build_evaluator(cfg, tokenizer, placement, kl_reference)
    log.info(
        "PPO: policy %.2fM parameters + value head on %s (%s); reward: %s; %d rollouts x %d "
        "episodes, %d epochs x %d minibatches of %d",
        sum(p.numel() for p in policy.parameters()) / 1e6,
        placement.device,
        placement.precision,
        training.reward_source,
        training.num_rollouts,
        ppo.rollout_batch_size,
        ppo.ppo_epochs,
        ppo.rollout_batch_size // ppo.mini_batch_size,
        ppo.mini_batch_size,
    )
    last_metrics: dict[str, float] = {"score": float("nan")}

    def run_eval(rollout_index: int, rollout: Rollout | None) -> None:
        nonlocal last_metrics
        last_metrics, tables = evaluator.evaluate(policy)
        tracker.log_metrics(last_metrics, training.episodes, "episodes")
        for name, table in tables.items():
            folder = "samples" if name == "unconditional" else f"samples/{name}"
            tracker.log_table(table, f"{folder}/rollout_{rollout_index:05d}.json")
        if rollout is not None:
            rows = ppo.samples_table_rows
            tracker.log_table(
                {
                    "prompt": rollout.prompts[:rows],
                    "response": rollout.generated.texts[:rows],
                    "score": [round(float(s), 6) for s in rollout.scores[:rows]],
                },
                f"rollouts/rollout_{rollout_index:05d}.json",
            )
        log.info(
            "eval after %d rollouts (%d episodes): score %.4f, score_max@25 %.4f, kl %.3f",
            rollout_index,
            training.episodes,
            last_metrics["score"],
            last_metrics["score_max_at_25"],
            last_metrics.get("kl", float("nan")),
        )

    run_eval(0, None)
    for rollout_index in range(1, training.num_rollouts + 1):
        rollout, metrics = training.iteration()
        tracker.log_metrics(metrics, training.episodes, "episodes")
        if rollout_index % cfg.train.log_steps == 0:
            log.info(
                "rollout %d/%d: scores %.4f, kl %.3f, kl_coef %.4f, %.1f episodes/s",
                rollout_index,
                training.num_rollouts,
                metrics["objective/scores"],
                metrics["objective/kl"],
                metrics["objective/kl_coef"],
                metrics["time/episodes_per_s"],
            )
        if rollout_index % ppo.eval_rollouts == 0 or rollout_index == training.num_rollouts:
            run_eval(rollout_index, rollout)

    final_dir = publish_model(training.save, output_dir, cfg, tracker)
    log.info("final policy saved to %s", final_dir)
    return last_metrics["score"]
