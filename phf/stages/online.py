"""What every online RL stage shares (PPO; GRPO, RLOO): the policy and its frozen reference, the
reward, the prompts, generating and re-scoring responses, the evaluation, the model files and
the checkpointed state common to them. Each stage subclasses ``OnlineStage`` with its update.

A response is sampled from the policy itself (no top-p: probability ratios need samples of the
distribution they are computed under), stops at the stop token, which cannot end it before
``min_response_length`` tokens, and its log-probabilities are those of that constrained
distribution. The reward is a reward model's normalised output or minus the task's scorer; a
reward without phf's stored normalisation gets one on samples of the initial policy, computed at
the first iteration and checkpointed.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from phf.checkpoints import python_rng_state, set_python_rng_state
from phf.data.prompts import online_prompts
from phf.distributed import DistributedContext, gather_objects, gather_rows
from phf.evaluation import Evaluator, left_padded_prompts
from phf.hardware import Placement
from phf.lora import base_weights, with_lora
from phf.lora import enabled as lora_enabled
from phf.models import load_model_and_tokenizer
from phf.reward_model import RewardModel, score_texts
from phf.sampling import SamplingConstraint, sample
from phf.scorers import build_scorer
from phf.sequences import joined, token_logprobs
from phf.stages.common import (
    build_evaluator,
    dataset_record,
    kl_from_start,
    process_share,
    publish_policy,
    restore_policy,
    save_policy,
    scenario_tables,
    token_store,
)
from phf.stages.loop import Tables
from phf.tracking import Tracker
from phf.training import PieceLoss

log = logging.getLogger(__name__)

RewardFunction = Callable[[Sequence[str], Sequence[str]], torch.Tensor]


class Reward:
    """(prompts, responses) -> rewards [n] on the CPU, normalised: by the reward model's stored
    gain and bias, or by those ``normalize`` finds on samples of the initial policy."""

    def __init__(self, raw: RewardFunction, description: str, needs_normalization: bool) -> None:
        self.raw = raw
        self.description = description
        self.needs_normalization = needs_normalization
        self.gain: float | None = None
        self.bias: float | None = None

    def __call__(self, prompts: Sequence[str], responses: Sequence[str]) -> torch.Tensor:
        rewards = self.raw(prompts, responses)
        if self.gain is None:
            return rewards
        return self.gain * rewards + self.bias

    @property
    def pending(self) -> bool:
        return self.needs_normalization and self.gain is None

    def normalize(self, rewards: torch.Tensor) -> None:
        rewards = torch.nan_to_num(rewards, nan=0.0)
        std = max(float(rewards.std()), 1e-6)
        self.gain, self.bias = 1.0 / std, -float(rewards.mean()) / std
        self.description += f", normalised (gain {self.gain:.3f}, bias {self.bias:+.3f})"

    def state(self) -> dict[str, Any]:
        return {"gain": self.gain, "bias": self.bias}

    def load_state(self, state: dict[str, Any]) -> None:
        self.gain, self.bias = state["gain"], state["bias"]


def build_scorers(settings: DictConfig, cfg: DictConfig) -> list[tuple[Any, float, str]]:
    """(scorer, weight, name) of ``settings.scorers`` ({name: weight}), or the task's scorer
    with weight 1."""
    if not settings.scorers:
        return [(build_scorer(cfg.scorer), 1.0, cfg.scorer.name)]
    from phf.config import CONF_DIR, ScorerConfig

    scorers = []
    for name, weight in settings.scorers.items():
        path = CONF_DIR / "scorer" / f"{name}.yaml"
        if not path.is_file():
            options = sorted(p.stem for p in (CONF_DIR / "scorer").glob("*.yaml"))
            raise ValueError(f"{settings}.scorers names {name!r}; scorers are {options}")
        scorer_cfg = OmegaConf.merge(OmegaConf.structured(ScorerConfig), OmegaConf.load(path))
        scorers.append((build_scorer(scorer_cfg), float(weight), name))
    return scorers


def build_reward(settings: DictConfig, cfg: DictConfig, placement: Placement) -> Reward:
    """The stage's reward: ``settings.reward_model``, or minus the (weighted) scorers."""
    if settings.reward_model is not None:
        model, tokenizer = RewardModel.load(settings.reward_model)
        model.to(placement.device).requires_grad_(False)

        def reward_model_rewards(prompts: Sequence[str], responses: Sequence[str]) -> torch.Tensor:
            return score_texts(model, tokenizer, prompts, responses, cfg.eval.batch_size, placement)

        needs = settings.normalize_reward and not model.normalized
        return Reward(reward_model_rewards, f"reward model {settings.reward_model}", needs)
    scorers = build_scorers(settings, cfg)

    def scorer_rewards(prompts: Sequence[str], responses: Sequence[str]) -> torch.Tensor:
        texts = (
            [p + r for p, r in zip(prompts, responses, strict=True)]
            if settings.score_prompt
            else list(responses)
        )
        total = torch.zeros(len(texts))
        for scorer, weight, _ in scorers:  # one batched call per scorer
            total -= weight * torch.tensor(scorer.score_texts(texts), dtype=torch.float32)
        return total

    described = " ".join(f"-{w:g} x {name}" for _, w, name in scorers)
    return Reward(scorer_rewards, f"{described} score", bool(settings.normalize_reward))


def stop_token_id(stop_token: str | None, tokenizer: PreTrainedTokenizerBase) -> int | None:
    if stop_token is None:
        return None
    if stop_token == "eos":
        return tokenizer.eos_token_id
    ids = tokenizer.encode(stop_token, add_special_tokens=False)
    if len(ids) != 1:
        raise ValueError(
            f"stop_token={stop_token!r} is {len(ids)} tokens for this tokenizer; it must be "
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


def rollout_constraint(
    settings: DictConfig, stop_id: int | None, tokenizer: PreTrainedTokenizerBase
) -> SamplingConstraint:
    """The distribution a stage's responses are sampled from and scored under: the stop token
    banned for the first ``min_response_length`` tokens; with no stop token, fixed-length
    responses, EOS banned throughout."""
    if stop_id is None:
        return SamplingConstraint(
            settings.temperature, tokenizer.eos_token_id, settings.response_length
        )
    return SamplingConstraint(settings.temperature, stop_id, settings.min_response_length)


def forward_response(
    model: PreTrainedModel,
    value_head: torch.nn.Module | None,
    query_ids: torch.Tensor,
    query_mask: torch.Tensor,
    response_ids: torch.Tensor,
    mask: torch.Tensor,
    constraint: SamplingConstraint,
    placement: Placement,
    with_entropy: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Log-probabilities [n, R] of the response tokens under the distribution they were sampled
    from (``constraint``), the values of the states they were sampled from, and the entropy
    [n, R] of that distribution at each position (no gradient; zeros unless
    ``with_entropy``). The output layer runs in chunks (phf/sequences.py) where the model
    allows it."""
    out = token_logprobs(
        model,
        joined(query_ids, query_mask, response_ids, mask),
        placement,
        first=query_ids.size(1) - 1,  # the position that predicts the first response token
        constraint=constraint,
        chunked=True,
        value_head=value_head,
        with_entropy=with_entropy,
    )
    entropy = out.entropy if out.entropy is not None else torch.zeros_like(out.logprobs)
    return out.logprobs, out.values, entropy


class ResponseForward(torch.nn.Module):
    """The policy (and PPO's value head) as one module whose forward gives a rollout's response
    log-probabilities, values and entropies (``forward_response``): what DDP wraps, so that a
    training forward passes through DDP and its gradients are averaged over the processes."""

    def __init__(
        self,
        policy: PreTrainedModel,
        value_head: torch.nn.Module | None,
        constraint: SamplingConstraint,
        placement: Placement,
    ) -> None:
        super().__init__()
        self.policy = policy
        self.value_head = value_head
        self.constraint = constraint
        self.placement = placement

    def forward(
        self,
        query_ids: torch.Tensor,
        query_mask: torch.Tensor,
        response_ids: torch.Tensor,
        mask: torch.Tensor,
        with_entropy: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        return forward_response(
            self.policy,
            self.value_head,
            query_ids,
            query_mask,
            response_ids,
            mask,
            self.constraint,
            self.placement,
            with_entropy,
        )


@dataclass
class Responses:
    query_ids: torch.Tensor  # [n, Q], left-padded EOS + prompt
    query_mask: torch.Tensor
    response_ids: torch.Tensor  # [n, R], right-padded
    mask: torch.Tensor  # [n, R] float
    found_stop: torch.Tensor  # [n] bool
    texts: list[str]  # without the stop token
    logprobs: torch.Tensor  # [n, R] of the sampled tokens, as sampling computed them
    seconds: float

    def gathered(self, distributed: DistributedContext, pad_id: int) -> Responses:
        """Every process's responses, in rank order (one process's rollout, whole)."""
        if not distributed.enabled:
            return self
        return Responses(
            gather_rows(self.query_ids, distributed, pad_id, left=True),
            gather_rows(self.query_mask, distributed, 0, left=True),
            gather_rows(self.response_ids, distributed, pad_id),
            gather_rows(self.mask, distributed, 0.0),
            gather_rows(self.found_stop, distributed),
            gather_objects(self.texts, distributed),
            gather_rows(self.logprobs, distributed, 0.0),
            self.seconds,
        )


def generate_responses(
    policy: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    stop_id: int | None,
    settings: DictConfig,
    placement: Placement,
    uniforms: torch.Tensor | None = None,
) -> Responses:
    """One sampled response per prompt, from the policy itself (phf/sampling.py), drawn with
    ``uniforms`` [prompts, response_length] when given."""
    was_training = policy.training
    policy.eval()
    start = time.perf_counter()
    query_ids, query_mask = left_padded_prompts(prompts, tokenizer, placement.device)
    sampled = sample(
        policy,
        query_ids,
        query_mask,
        settings.response_length,
        rollout_constraint(settings, stop_id, tokenizer),
        stop_id,
        tokenizer.pad_token_id,
        placement,
        None if uniforms is None else uniforms.to(placement.device),
    )
    seconds = time.perf_counter() - start
    policy.train(was_training)
    response_ids = sampled.tokens
    mask, found_stop = response_mask(response_ids, stop_id)
    texts = []
    for row, length in zip(response_ids.tolist(), mask.sum(dim=1).long().tolist(), strict=True):
        kept = row[:length]
        if kept and kept[-1] == stop_id:
            kept = kept[:-1]
        texts.append(tokenizer.decode(kept, skip_special_tokens=True))
    return Responses(
        query_ids, query_mask, response_ids, mask, found_stop, texts, sampled.logprobs, seconds
    )


class OnlineStage:
    """The part of an online RL stage that PPO, GRPO and RLOO share (module docstring).

    Subclasses set ``name``, ``title`` and ``section`` (their config section), build their
    ``optimization`` (phf/training.py) and implement ``step``.

    Under data parallelism every process draws the same global prompts and samples its share
    of them, each response drawn with uniform numbers from a generator seeded by the run's seed
    and the iteration, taken by the response's place in the global rollout: N processes sample
    the tokens one process would. The shares are then gathered, so that every statistic the
    method defines over the batch (whitening, group baselines) is the global batch's, and each
    process updates on its share of every minibatch.
    """

    name = "ppo"
    title = "PPO"
    section = "ppo"
    data_parallel = (
        "each process samples, scores and updates on its share of every rollout; the rollout "
        "is gathered for the batch's statistics"
    )
    progress_metric = "episodes"
    progress_label = "episodes"
    rate_metric = "time/episodes_per_s"
    headline = "score"
    section = "ppo"

    def __init__(
        self,
        cfg: DictConfig,
        placement: Placement,
        distributed: DistributedContext,
        policy: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        reference: PreTrainedModel | None,
    ) -> None:
        self.cfg = cfg
        self.placement = placement
        self.distributed = distributed
        self.policy = policy
        self.tokenizer = tokenizer
        self.reference = reference
        settings = self.settings
        self.prompts = online_prompts(settings, cfg.task, tokenizer)
        self.prompt_pool = self.prompts.train
        # Evaluated as the task's scenarios, and on the held-out prompts as "prompts"; KL is
        # from the policy as it starts (built before any update).
        extra = {"prompts": (self.prompts.heldout, bool(settings.score_prompt))}
        self.evaluator = None
        if distributed.is_main:
            self.evaluator = self.kl_evaluator(
                cfg, policy, tokenizer, placement, extra if self.prompts.heldout else None
            )
        self.reward = build_reward(settings, cfg, placement)
        self.stop_id = stop_token_id(settings.stop_token, tokenizer)
        self.constraint = rollout_constraint(settings, self.stop_id, tokenizer)
        self.rng = random.Random(cfg.seed)
        self.steps_done = 0
        self.progress = 0  # episodes
        self.last_table: dict[str, list] | None = None

    @property
    def settings(self) -> DictConfig:
        return self.cfg[self.section]

    @staticmethod
    def load_policy(
        cfg: DictConfig, settings: DictConfig, placement: Placement, keep_reference: bool = True
    ) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, PreTrainedModel | None]:
        """The policy (model.pretrained, with LoRA adapters when model.lora.r > 0), its
        tokenizer and the frozen reference: a copy of the starting policy, or with LoRA none
        (the policy's base weights, its adapters off, are the reference: no second copy)."""
        if cfg.model.pretrained is None:
            log.warning(
                "model.pretrained is null: the policy starts from a randomly initialised model; "
                "set it to a pretrained model, e.g. runs:/<run id>/model of an objective=mle run"
            )
        policy, tokenizer = load_model_and_tokenizer(cfg.model, cfg.train.block_size)
        policy.to(placement.device)
        reference = None
        if keep_reference and not lora_enabled(cfg.model.lora):
            reference = copy.deepcopy(policy).eval().requires_grad_(False)
        return with_lora(policy, cfg.model.lora, "CAUSAL_LM"), tokenizer, reference

    def reference_logprobs(self, *batch: Any) -> torch.Tensor:
        """Log-probabilities of a rollout's responses under the reference (forward_response's
        arguments after the model and value head)."""
        if self.reference is not None:
            return forward_response(self.reference, None, *batch, with_entropy=False)[0]
        with base_weights(self.policy):
            return forward_response(self.policy, None, *batch, with_entropy=False)[0]

    @staticmethod
    def kl_evaluator(
        cfg: DictConfig,
        policy: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        placement: Placement,
        extra: dict[str, tuple[list[str], bool]] | None = None,
    ) -> Evaluator:
        """The shared evaluation, with KL from the initial policy unless eval.kl_reference
        names another (the policy is still the initial one here)."""
        kl = kl_from_start(cfg, policy, tokenizer, placement)
        return build_evaluator(cfg, tokenizer, placement, kl, extra_scenarios=extra)

    def check_lengths(self) -> None:
        settings = self.settings
        longest = 1 + max(
            len(self.tokenizer.encode(p, add_special_tokens=False)) for p in self.prompt_pool
        )
        positions = getattr(self.policy.config, "n_positions", None)
        if positions is not None and longest + settings.response_length > positions:
            raise ValueError(
                f"prompts of up to {longest} tokens + {self.section}.response_length="
                f"{settings.response_length} exceed the model's {positions} positions; lower "
                f"{self.section}.response_length or use shorter prompts"
            )

    def draw_prompts(self, count: int) -> list[str]:
        """``count`` prompts of the global rollout (the same in every process)."""
        return [self.rng.choice(self.prompt_pool) for _ in range(count)]

    def generator(self, purpose: str, index: int = 0) -> torch.Generator:
        """A generator seeded by the run's seed, the iteration, ``purpose`` and ``index``: the
        same in every process, and after a resume."""
        key = f"{self.cfg.seed}/{self.steps_done}/{purpose}/{index}"
        return torch.Generator().manual_seed(int(hashlib.sha256(key.encode()).hexdigest()[:15], 16))

    def sample_share(self, prompts: list[str], purpose: str) -> tuple[list[str], Responses]:
        """This process's share of ``prompts`` (the global rollout's) and its responses, each
        drawn with the uniform numbers of its place in the global rollout."""
        uniforms = torch.rand(
            len(prompts), self.settings.response_length, generator=self.generator(purpose)
        )
        rows = process_share(list(range(len(prompts))), self.distributed)
        mine = [prompts[i] for i in rows]
        responses = generate_responses(
            self.policy,
            self.tokenizer,
            mine,
            self.stop_id,
            self.settings,
            self.placement,
            uniforms[rows],
        )
        return mine, responses

    def update_on_rollout(
        self,
        passes: int,
        mini_batch_size: int,
        piece_loss: PieceLoss,
        weight: Callable[[torch.Tensor], float],
        hint: str = "lower train.lr",
    ) -> dict[str, Any]:
        """``passes`` over the (gathered) rollout in seeded minibatch orders, one update per
        minibatch: this process forwards and backwards its share of the minibatch's episodes in
        micro-batches, ``piece_loss`` giving their loss and metric sums, divided by
        ``weight(minibatch)`` (its tokens or sequences, over every process). Returns the means
        over the updates of the metrics, ``loss``, ``train/grad_norm`` and ``train/lr``."""
        sums: dict[str, Any] = {}
        updates = 0
        micro = self.cfg.hardware.micro_batch_size
        episodes = self.settings.rollout_batch_size
        for index in range(passes):
            order = torch.randperm(episodes, generator=self.generator("order", index))
            for minibatch in order.split(mini_batch_size):
                mine = torch.tensor(process_share(minibatch.tolist(), self.distributed))
                total = weight(minibatch)
                piece_sums = self.optimization.accumulate(
                    self.network, mine.split(micro), piece_loss, total
                )
                metrics = {name: value / total for name, value in piece_sums.items()}
                update = self.optimization.step(
                    metrics["loss"], f"iteration {self.steps_done + 1}", hint
                )
                for name, value in (metrics | update).items():
                    sums[name] = sums.get(name, 0.0) + value
                updates += 1
        return {name: value / updates for name, value in sums.items()}

    def gather(self, value: torch.Tensor) -> torch.Tensor:
        """Every process's rows of a rollout quantity (module docstring of the class)."""
        return gather_rows(value, self.distributed)

    def ensure_normalized_reward(self) -> None:
        """At the first iteration: normalise a reward that needs it, on samples of the
        (still initial) policy."""
        if not self.reward.pending:
            return
        settings = self.settings
        raw = []
        for first in range(0, settings.normalization_episodes, settings.rollout_batch_size):
            count = min(settings.rollout_batch_size, settings.normalization_episodes - first)
            prompts, responses = self.sample_share(self.draw_prompts(count), f"norm{first}")
            rewards = self.reward.raw(prompts, responses.texts).to(self.placement.device)
            raw.append(self.gather(rewards).cpu())
        self.reward.normalize(torch.cat(raw))
        log.info("reward: %s", self.reward.description)

    def scores(self, prompts: list[str], generated: Responses) -> torch.Tensor:
        """Rewards of a rollout, an unscorable text earning nothing, the missing-stop penalty
        applied."""
        scores = torch.nan_to_num(self.reward(prompts, generated.texts), nan=0.0)
        scores = scores.to(self.placement.device)
        penalty = self.settings.missing_stop_penalty
        if penalty is not None:
            scores = torch.where(generated.found_stop, scores, scores - penalty)
        return scores

    def remember_rollout(
        self, prompts: list[str], generated: Responses, scores: torch.Tensor
    ) -> None:
        rows = self.settings.samples_table_rows
        self.last_table = {
            "sample": [f"rollout/{i}" for i in range(min(rows, len(prompts)))],
            "prompt": prompts[:rows],
            "response": generated.texts[:rows],
            "score": [round(float(s), 6) for s in scores[:rows]],
        }

    # ------------------------------------------------------------------ the contract

    def evaluate(self) -> tuple[dict[str, float], Tables]:
        assert self.evaluator is not None, "only the main process evaluates"
        metrics, tables = self.evaluator.evaluate(self.policy)
        tables = scenario_tables(tables)
        if self.last_table is not None:
            tables["rollouts"] = self.last_table
        return metrics, tables

    def describe(self, metrics: dict[str, float]) -> str:
        return (
            f"score {metrics['score']:.4f}, score_max_at_25 {metrics['score_max_at_25']:.4f}, "
            f"kl {metrics.get('kl', float('nan')):.3f}"
        )

    def training_state(self) -> dict[str, Any]:
        return {
            "step": self.steps_done,
            "progress": self.progress,
            "rng": python_rng_state(self.rng),
            "reward": self.reward.state(),
            # The reference is rebuilt from it (the config, compared on resume, pins it).
            "reference": self.cfg.model.pretrained,
        } | self.optimization.state()

    def restore(self, directory: Path, state: dict[str, Any]) -> None:
        restore_policy(self.policy, directory)
        set_python_rng_state(state["rng"], self.rng)
        self.reward.load_state(state["reward"])
        self.optimization.load_state(state)
        self.steps_done, self.progress = state["step"], state["progress"]

    def save(self, directory: Path) -> None:
        save_policy(directory, self.policy, self.tokenizer, self.cfg)

    def publish(self, directory: Path, tracker: Tracker) -> None:
        publish_policy(directory, self.policy, self.tokenizer, self.cfg, tracker)

    def datasets(self) -> list[dict[str, Any]]:
        test = self.cfg.task.test_split
        store = token_store(self.cfg, test, self.tokenizer)
        return [dataset_record(self.cfg, store, test, "evaluation")]
