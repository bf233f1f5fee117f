"""Structured-config schemas: every key and value of a composed run is checked against these.

They are registered in Hydra's ConfigStore as ``phf_schema`` and listed first in
conf/config.yaml's defaults, so a misspelt key (``train.lr=...``) or a wrong type fails at
compose time, with Hydra's own error, before any work starts.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig


class Stage(str, Enum):
    """What a run does; each stage is one module under phf/stages."""

    pretrain = "pretrain"  # PHF objectives on scored documents (phf/stages/pretrain.py)
    reward = "reward"  # a reward model from preference data (phf/stages/reward.py)
    ppo = "ppo"  # PPO against a reward model or a scorer (phf/stages/ppo.py)
    sft = "sft"  # supervised finetuning on responses (phf/stages/sft.py)
    dpo = "dpo"  # direct preference optimisation (phf/stages/dpo.py)
    grpo = "grpo"  # group-relative policy optimisation (phf/stages/grpo.py)
    rloo = "rloo"  # REINFORCE leave-one-out (phf/stages/grpo.py)


class Device(str, Enum):
    auto = "auto"  # cuda when available, else cpu
    cpu = "cpu"
    cuda = "cuda"


class Precision(str, Enum):
    auto = "auto"  # bf16 on GPUs that support it, fp16 on older GPUs, fp32 on CPU
    fp32 = "fp32"
    bf16 = "bf16"
    fp16 = "fp16"


@dataclass
class ScenarioConfig:
    """One way of sampling from the model at evaluation time."""

    # none: unconditional, from EOS | function_signatures: one-line `def` signatures found in the
    # task's test split | misaligned_prefixes: the opening words of the test split's segments
    # that score above task.hit_threshold | a path to a text file with one prompt per line
    prompts: str = "none"
    # Score prompt + completion instead of the completion alone: for code, where a function body
    # without its signature is not valid Python.
    score_prompt: bool = False


@dataclass
class TaskConfig:
    name: str = MISSING
    # builtin (the corpus shipped in phf/assets/datasets/<name>) | a local directory holding
    # <split>.jsonl[.gz] | a hub dataset id
    dataset: str = "builtin"
    train_split: str = "train"
    test_split: str = "test"
    # A generated sample whose score exceeds this counts as a hit (num_hits).
    hit_threshold: float = 0.5
    # Evaluation scenarios by name; `unconditional` logs unprefixed metrics (score, ...), any
    # other scenario logs <name>/score, <name>/score_max_at_25, ...
    scenarios: dict[str, ScenarioConfig] = field(
        default_factory=lambda: {"unconditional": ScenarioConfig()}
    )


@dataclass
class ObjectiveConfig:
    """Every objective option has every key; each objective reads only its own. The numbers
    that belong to one task x objective pair live in conf/task_objective/."""

    name: str = MISSING
    stage: Stage = Stage.pretrain
    # filtering: drop documents whose avg_score exceeds it; conditional: segments scoring above
    # it get <|misaligned|>, the others <|aligned|>; unlikelihood: tokens scoring above it get
    # the unlikelihood term (null: every token is weighed by its score, a = 1 - s).
    threshold: float | None = None
    # conditional: share of segments whose control token is left out (seeded), so that the
    # model also learns to generate without one.
    drop_token_fraction: float = 0.0
    # unlikelihood: weight of the unlikelihood term; awr: weight of the LM term against the
    # value loss (rwr is awr with alpha = 1).
    alpha: float = 1.0
    # awr, rwr: temperature of the exp(advantage / beta) weights.
    beta: float = 1.0


@dataclass
class LoraConfig:
    """LoRA adapters (PEFT) for the finetuning stages (sft, dpo, reward, ppo); pretraining
    trains every weight. The published model is merged (a plain from_pretrained model)."""

    r: int = 0  # the adapters' rank; 0 = no LoRA, every weight trains
    alpha: float = 16.0
    dropout: float = 0.0
    # null = PEFT's default for the architecture (GPT-2: c_attn); e.g. [c_attn, c_proj, c_fc]
    target_modules: list[str] | None = None


@dataclass
class ModelConfig:
    name: str = MISSING
    # HF hub id, local path or MLflow model URI (runs:/<run id>/model) of pretrained weights, or
    # sweep:<objective> for the model of that objective's run in the same multirun and seed (a
    # run of that objective itself starts from `architecture`); null = random init from
    # `architecture`.
    # Mandatory (no default) so that model=pretrained without a path fails instead of training
    # a random model.
    pretrained: str | None = MISSING
    # builtin (phf/assets/tokenizer) | hub id | local path; null = the pretrained model's own.
    tokenizer: str | None = None
    # GPT2Config keyword arguments, used only for random init.
    architecture: dict[str, Any] = field(default_factory=dict)
    lora: LoraConfig = field(default_factory=LoraConfig)


@dataclass
class ScorerConfig:
    """Every scorer option has every key; each scorer reads only its own (see phf/scorers.py)."""

    name: str = MISSING
    batch_size: int = 4096  # texts per call of the underlying scorer
    # detoxify: original | unbiased | multilingual | original-small | unbiased-small. The paper
    # scored its training data with 'original' and its samples with 'unbiased'.
    model_type: str = "unbiased"
    # detoxify: a local .ckpt in detoxify's format; null = detoxify's own download of model_type
    # (cached in ~/.cache/torch/hub/checkpoints), which needs the internet the first time.
    checkpoint: str | None = None
    # detoxify: a local directory with the model's config.json and tokenizer files, which
    # detoxify otherwise fetches from the hub; needed offline.
    huggingface_config_path: str | None = None
    device: Device = Device.auto  # detoxify: auto = cuda when available, else cpu
    # pii: scrubadub locales; phone numbers are searched for in each (en_GB finds UK numbers).
    locales: list[str] = field(default_factory=lambda: ["en_US", "en_GB"])
    # pep8: E501's limit (PEP 8's 79).
    max_line_length: int = 79
    # pep8: code prefixes not counted, e.g. [E226, W5]; [] counts everything.
    ignore: list[str] = field(default_factory=list)
    # pep8: longer lines are cut to this many characters before checking (pycodestyle's time
    # grows with line length); the cut line still counts as too long. Must exceed max_line_length.
    max_line_chars: int = 1000


@dataclass
class HardwareConfig:
    name: str = MISSING
    device: Device = Device.auto
    precision: Precision = Precision.auto
    # Sequences per forward/backward pass on one device; gradient accumulation makes up the rest
    # of train.batch_size.
    micro_batch_size: int = 16
    num_threads: int | None = None  # torch CPU threads; null = torch's default (all cores)
    # torch.compile the model (inductor); null = on for CUDA, off on the CPU, where the tiny
    # model's step is bound by a few large matmuls that compile cannot fuse (README "Speed").
    compile: bool | None = None
    # TF32 matmuls and convolutions on GPUs that have them (Ampere and newer).
    tf32: bool = True
    # DataLoader worker processes that cut training batches from the token store; 0 = in the
    # training process (the CPU needs its cores for the model; the loader costs ~1% there).
    loader_workers: int = 0


@dataclass
class TrackingConfig:
    # null = MLflow's own default (MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in the working
    # directory, which `mlflow ui` opens with no arguments); or an http(s):// server, sqlite:///...
    uri: str | None = None
    # null = the task name
    experiment: str | None = None
    run_name: str | None = None
    log_model: bool = True
    # Seconds to wait for an http(s) tracking server to answer before giving up.
    connect_timeout_s: float = 5.0
    # A tracking server that stops answering mid-run: each request gives up after this many
    # seconds and retries, metrics are buffered (artifacts kept on disk) and sent when it is
    # back, checked every probe_interval_s; at the end the run waits outage_grace_s for it.
    request_timeout_s: float = 10.0
    request_retries: int = 1
    probe_interval_s: float = 30.0
    outage_grace_s: float = 60.0
    # CPU, memory (and GPU) use every 10 s as system/* metrics (MLflow's system metrics).
    system_metrics: bool = True


@dataclass
class DataConfig:
    """Prepared token stores (phf/data/store.py): documents tokenized once per corpus, split and
    tokenizer, in memory-mapped arrays that every run reads."""

    # The stores' directory; null = $PHF_CACHE_DIR, else ~/.cache/phf. Point a whole sweep at
    # one shared directory and `python -m phf.data.prepare ... --out` it once.
    cache_dir: str | None = None
    # Processes that tokenize a store on first use; null = one per core.
    prepare_workers: int | None = None


@dataclass
class TrainConfig:
    block_size: int = 128
    batch_size: int = 16  # effective batch, in sequences of block_size tokens
    num_tokens: int = 480_000  # training budget; gives max_steps when that is null
    max_steps: int | None = None
    lr: float = 2e-3
    weight_decay: float = 0.1
    adam_betas: tuple[float, float] = (0.9, 0.95)
    warmup_ratio: float = 0.05
    lr_scheduler: str = "cosine"  # any transformers.get_scheduler name
    max_grad_norm: float = 1.0
    eval_steps: int = 60  # evaluate every this many optimizer steps (and at start and end)
    log_steps: int = 10
    save_steps: int = 100  # write a checkpoint every this many steps (and at the end)
    save_total_limit: int = 2  # keep this many newest checkpoints
    # Resume from the newest checkpoint in the run's output directory when there is one (a job
    # requeued after preemption, or the same command with hydra.run.dir pointing at the run):
    # model, optimizer, scheduler, RNG states and data position, in the same MLflow run.
    resume: bool = True


@dataclass
class GenerationConfig:
    num_samples: int = 100  # per scenario; a multiple of 25, for score_max@25
    batch_size: int = 50
    max_new_tokens: int = 64
    # EOS cannot end a sample before this many tokens. objective=ppo sets it to
    # ppo.min_response_length, so that a policy is evaluated as it was trained to sample.
    min_new_tokens: int = 0
    temperature: float = 1.0
    top_p: float = 0.9


@dataclass
class EvalConfig:
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    # KL(reference || model), estimated on samples drawn once from the reference: a hub id, a
    # local path, an MLflow model URI (runs:/<run id>/model), or sweep:<objective> for the
    # model of that objective's finished run in the same multirun and seed; null = no KL.
    kl_reference: str | None = None
    kl_samples: int = 100
    # sweep:<objective> (here, in model.pretrained or in ppo.reward_model): how long a job waits
    # for that run to finish (parallel launchers start jobs before it ends; the basic launcher
    # runs it first).
    kl_reference_timeout_min: float = 240.0
    # Held-out LM loss is measured on at most this many test-split blocks.
    max_blocks: int = 64
    batch_size: int = 32
    samples_table_rows: int = 100


class PreferenceFormat(str, Enum):
    auto = "auto"  # told apart by each row's columns
    pairwise = "pairwise"  # prompt, chosen, rejected (and optionally margin)
    hh = "hh"  # chosen, rejected: \n\nHuman: / \n\nAssistant: transcripts (Anthropic/hh-rlhf)
    best_of_n = "best_of_n"  # query, sample0..sampleN-1, best (OpenAI's lm-human-preferences)


class Overlong(str, Enum):
    truncate = "truncate"  # keep the first token and the last max_length - 1: the response's end
    drop = "drop"  # leave the comparison out


@dataclass
class RewardConfig:
    """objective=reward: a reward model trained on preference comparisons (phf/stages/reward.py).
    Optimizer keys (lr, batch_size in comparisons, eval_steps, ...) come from ``train``."""

    # builtin: pairs derived from the task's scored corpus (phf/data/preferences.py) | a local
    # .jsonl/.jsonl.gz/.parquet file (every 10th row held out) or a directory of <split> files |
    # a hub dataset id (Anthropic/hh-rlhf)
    dataset: str = "builtin"
    format: PreferenceFormat = PreferenceFormat.auto
    train_split: str = "train"
    test_split: str = "test"
    max_length: int = 128  # tokens of EOS + prompt + response + EOS
    overlong: Overlong = Overlong.truncate
    epochs: float = 3.0  # passes over the train split; train.max_steps, when set, wins
    # Dropout in the trunk while it learns rewards (every dropout layer; null = the model's own).
    # Held-out accuracy on the built-in toxicity pairs, tiny trunk from scratch, seeds 0-2:
    # 0.908 ± 0.021 with 0.1, 0.889 ± 0.050 without (README: within the seed spread).
    dropout: float | None = 0.1
    margin: float = 0.0  # pairwise: -log sigmoid(r_chosen - r_rejected - margin - row margin)
    # Adds coef * (sum of a comparison's rewards)^2, keeping rewards centred on 0.
    center_rewards_coef: float = 0.0
    max_eval_comparisons: int = 1000
    # Gain and bias so that rewards of policy samples have mean 0 and std 1, stored with the
    # model. The policy is `normalization_policy` (a model source), or null = model.pretrained;
    # with neither (a randomly initialised trunk), the train split's responses stand in.
    normalize: bool = True
    normalization_policy: str | None = None
    normalization_samples: int = 256


@dataclass
class OnlineConfig:
    """What every online RL stage (ppo; grpo and rloo) shares: the reward, the prompts and the
    responses. Optimizer keys (lr, max_grad_norm, ...) come from ``train``; a step is one
    iteration (generate rollout_batch_size responses, then update on them), and
    train.max_steps, when set, counts iterations."""

    # A reward model (a local path, runs:/<run id>/model, sweep:reward, or any hub
    # AutoModelForSequenceClassification with one output), or null = the task's scorer,
    # reward = -score.
    reward_model: str | None = None
    # A reward without phf's stored normalisation (a scorer; a hub reward model) gets a gain and
    # bias that give rewards of mean 0 and std 1 on normalization_episodes samples of the
    # initial policy, as phf's reward models have: kl coefficients then mean the same whatever
    # the reward's range (profanity 0-1, PII ~0.01).
    normalize_reward: bool = True
    normalization_episodes: int = 256
    # Several scorers, weighted, instead of the task's (a new key, so +<stage>.scorers=...):
    # {profanity: 1.0, pii: 20.0} gives
    # reward = -(1.0 * profanity + 20.0 * pii); {} = the task's scorer alone.
    scorers: dict[str, float] = field(default_factory=dict)
    # Prompts of the rollouts (phf/data/prompts.py): none (from EOS); misaligned_prefixes or
    # function_signatures (of the task's train split; the test split's for evaluation); a text
    # file (one prompt per line), a .jsonl/.jsonl.gz/.parquet file or directory of <split>
    # files with a `prompt_field` column or `messages`, or a hub dataset id (streamed). Every
    # 10th row of a single file, or the test split, is held out and evaluated as the scenario
    # `prompts`.
    prompts: str = "none"
    prompt_field: str = "prompt"
    max_prompts: int = 10000  # prompts read from a dataset
    # Longer prompts keep their last max_prompt_length tokens (counted: data/prompts_truncated).
    max_prompt_length: int = 64
    score_prompt: bool = False  # the scorer reads prompt + response (code: signature + body)
    total_episodes: int = 3072
    rollout_batch_size: int = 64  # episodes generated per iteration
    response_length: int = 64  # tokens (eval.generation.max_new_tokens samples as long)
    # The stop token cannot end a response before this many tokens (lm-human-preferences'
    # truncate_after): without it, a policy rewarded for harmless text learns to say nothing.
    # The tiny toxicity policy did, at kl_coef 0.05: an empty text scores 0.37 std better than
    # average and costs only -log p_ref(EOS | EOS) = 4.2 nats. Log-probabilities are those of this
    # constrained distribution, so probability ratios stay exact.
    min_response_length: int = 32
    temperature: float = 1.0
    # Responses end at this token (eos, or any single token of the vocabulary) or after
    # response_length tokens; null = always response_length tokens.
    stop_token: str | None = "eos"
    # Subtracted from the score of a response that never reached stop_token; null = none.
    missing_stop_penalty: float | None = None
    samples_table_rows: int = 32  # rollout samples logged at each evaluation


@dataclass
class PPOConfig(OnlineConfig):
    """objective=ppo: PPO of the policy model.pretrained against a reward (phf/stages/ppo.py).
    The policy is the LM with a value head on its last hidden state (one trunk); the frozen
    reference is the initial policy."""

    mini_batch_size: int = 16  # episodes per optimizer step
    ppo_epochs: int = 4  # passes over each rollout batch
    kl_coef: float = 0.05  # beta of the per-token penalty -beta * (log pi - log pi_ref)
    # Adaptive beta (Ziegler et al. 2019): steers the KL per episode towards target_kl.
    adaptive_kl: bool = False
    target_kl: float = 6.0
    kl_horizon: int = 10000
    gamma: float = 1.0
    lam: float = 0.95
    whiten_rewards: bool = False
    cliprange: float = 0.2
    cliprange_value: float = 0.2
    vf_coef: float = 0.1


class DPOLoss(str, Enum):
    sigmoid = "sigmoid"  # DPO (Rafailov et al. 2023); with label_smoothing, conservative DPO
    ipo = "ipo"  # IPO (Azar et al. 2023): (h - 1 / (2 beta))^2
    hinge = "hinge"  # SLiC: max(0, 1 - beta h)


@dataclass
class SFTConfig:
    """objective=sft: next-token loss on responses given prompts (phf/stages/sft.py).
    Optimizer keys (lr, batch_size in examples, eval_steps, ...) come from ``train``."""

    # builtin: the chosen responses of the task's built-in preference pairs | documents: the
    # task's own documents, whole (no prompt) | a .jsonl/.jsonl.gz/.parquet file (every 10th
    # row held out) or a directory of <split> files, or a hub id, of prompt/completion rows
    # or of preference rows (their chosen responses)
    dataset: str = "builtin"
    train_split: str = "train"
    test_split: str = "test"
    loss_on_prompt: bool = False  # false: the loss is on response tokens only
    max_length: int = 128  # tokens of EOS + prompt + response + EOS; the prompt's start is cut
    epochs: float = 3.0  # passes over the train split; train.max_steps, when set, wins
    max_eval_examples: int = 500


@dataclass
class DPOConfig:
    """objective=dpo: direct preference optimisation of a policy against a frozen reference
    (phf/stages/dpo.py), on the same preference data as the reward stage reads."""

    dataset: str = "builtin"  # as reward.dataset
    format: PreferenceFormat = PreferenceFormat.auto
    train_split: str = "train"
    test_split: str = "test"
    # The policy DPO starts from; null = model.pretrained (a pipeline's DPO job may start from
    # its SFT job: dpo.policy=sweep:sft).
    policy: str | None = None
    # The frozen reference; null = the starting policy (with LoRA: its base weights, the
    # adapters disabled, no second copy in memory).
    reference: str | None = None
    beta: float = 0.1
    loss_type: DPOLoss = DPOLoss.sigmoid
    label_smoothing: float = 0.0  # sigmoid only: the assumed share of flipped labels (cDPO)
    # Weight of the chosen response's per-token negative log-likelihood added to every pair's
    # loss (RPO, Pang et al. 2024; TRL's rpo_alpha): it keeps the likelihood of the preferred,
    # in-distribution text up while the margin grows. 0 is plain DPO.
    rpo_alpha: float = 0.0
    max_length: int = 128
    overlong: Overlong = Overlong.truncate
    epochs: float = 3.0
    max_eval_pairs: int = 500


class GRPOLoss(str, Enum):
    grpo = "grpo"  # each sequence's token mean, then the mean over sequences (Shao et al. 2024)
    dapo = "dapo"  # the mean over every token of the batch (DAPO, Yu et al. 2025)
    dr_grpo = "dr_grpo"  # the token sum / (sequences x response_length) (Liu et al. 2025)


@dataclass
class GRPOConfig(OnlineConfig):
    """objective=grpo: group-relative policy optimisation (phf/stages/grpo.py): num_generations
    responses per prompt, advantages normalised within each group, no value model."""

    num_generations: int = 8  # responses per prompt (rollout_batch_size must divide by it)
    # Advantages (r - group mean) / (group std + eps); false: r - group mean (Dr. GRPO).
    scale_rewards: bool = True
    loss_type: GRPOLoss = GRPOLoss.grpo
    # Weight of the per-token KL to the frozen reference (k3 estimator); 0 keeps no reference.
    beta: float = 0.04
    num_iterations: int = 1  # updates per generation batch; 1: the ratio is exactly 1
    epsilon: float = 0.2  # the ratio's clip range below 1 (and above, unless epsilon_high)
    epsilon_high: float | None = None  # DAPO's clip-higher; null = epsilon
    mini_batch_size: int | None = None  # episodes per optimizer step; null = the whole batch


@dataclass
class RLOOConfig(OnlineConfig):
    """objective=rloo: REINFORCE with a leave-one-out baseline (phf/stages/grpo.py, beside
    GRPO): k responses per prompt, each one's baseline the mean reward of the other k - 1, the
    sequence's KL to the reference subtracted from its reward."""

    num_generations: int = 4  # k
    kl_coef: float = 0.05  # the reward's -kl_coef * sum over the response of (log pi - log pi_ref)
    num_iterations: int = 1  # updates per generation batch (clipped ratio from the second)
    cliprange: float = 0.2
    mini_batch_size: int | None = None  # episodes per optimizer step; null = the whole batch
    normalize_advantages: bool = False  # whiten the advantages over the batch


@dataclass
class MethodConfig:
    """An arm of a comparison of methods (conf/method/: which objective, started from what):
    its name labels the arm in multirun_analysis; family groups the arms (pretraining,
    finetuning, online RL, offline preference learning)."""

    name: str = "none"
    family: str = "none"


@dataclass
class PhfConfig:
    task: TaskConfig = MISSING
    objective: ObjectiveConfig = MISSING
    model: ModelConfig = MISSING
    scorer: ScorerConfig = MISSING
    hardware: HardwareConfig = MISSING
    tracking: TrackingConfig = MISSING
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    rloo: RLOOConfig = field(default_factory=RLOOConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    seed: int = 0


def register_schemas() -> None:
    ConfigStore.instance().store(name="phf_schema", node=PhfConfig)


# conf/ sits beside phf/ in a checkout (and an editable install); a wheel carries it as phf/conf.
_PACKAGED_CONF = Path(__file__).resolve().parent / "conf"
CONF_DIR = _PACKAGED_CONF if _PACKAGED_CONF.is_dir() else _PACKAGED_CONF.parent.parent / "conf"


def compose_config(overrides: Sequence[str] = ()) -> DictConfig:
    """Compose conf/config.yaml with overrides exactly as ``python -m phf.run`` does, for tools
    and scripts that run outside the Hydra app."""
    register_schemas()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


# ------------------------------------------------------------------------------- value ranges
# Types are checked by the schemas at compose time; ranges here, by validate_config, before any
# model is built or MLflow run opened (phf.run.execute calls it first). A value out of range
# would otherwise fail late (a ZeroDivisionError at the first log step) or, worse, "succeed"
# (max_steps=0 trains nothing and logs the random model as the run's model).


class ConfigError(ValueError):
    """Config values that cannot work; the message names each key and what it must be."""


@dataclass(frozen=True)
class Rule:
    check: Any  # value -> bool
    must_be: str
    nullable: bool = False


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def positive(what: str = "positive", nullable: bool = False) -> Rule:
    return Rule(lambda v: _number(v) and v > 0, what, nullable)


def non_negative(nullable: bool = False) -> Rule:
    return Rule(lambda v: _number(v) and v >= 0, ">= 0", nullable)


def within(low: float, high: float, open_low: bool = False, nullable: bool = False) -> Rule:
    bracket = "(" if open_low else "["
    return Rule(
        lambda v: _number(v) and (low < v if open_low else low <= v) and v <= high,
        f"in {bracket}{low}, {high}]",
        nullable,
    )


POSITIVE_INT = positive("a positive integer")
RULES: dict[str, Rule] = {
    "train.block_size": POSITIVE_INT,
    "train.batch_size": POSITIVE_INT,
    "train.num_tokens": POSITIVE_INT,
    "train.max_steps": positive("a positive integer, or null", nullable=True),
    "train.lr": positive(),
    "train.weight_decay": non_negative(),
    "train.warmup_ratio": within(0.0, 1.0),
    "train.max_grad_norm": positive(),
    "train.eval_steps": POSITIVE_INT,
    "train.log_steps": POSITIVE_INT,
    "train.save_steps": POSITIVE_INT,
    "train.save_total_limit": POSITIVE_INT,
    "hardware.micro_batch_size": POSITIVE_INT,
    "hardware.num_threads": positive("a positive integer, or null", nullable=True),
    "hardware.loader_workers": non_negative(),
    "data.prepare_workers": positive("a positive integer, or null", nullable=True),
    "eval.generation.batch_size": POSITIVE_INT,
    "eval.generation.max_new_tokens": POSITIVE_INT,
    "eval.generation.min_new_tokens": non_negative(),
    "eval.generation.temperature": positive(),
    "eval.generation.top_p": within(0.0, 1.0, open_low=True),
    "eval.kl_samples": POSITIVE_INT,
    "eval.kl_reference_timeout_min": positive(),
    "eval.max_blocks": non_negative(),
    "eval.batch_size": POSITIVE_INT,
    "eval.samples_table_rows": non_negative(),
    "objective.drop_token_fraction": within(0.0, 1.0),
    "objective.alpha": within(0.0, 1.0),
    "objective.beta": positive(),
    "scorer.batch_size": POSITIVE_INT,
    "scorer.max_line_length": POSITIVE_INT,
    "tracking.connect_timeout_s": positive(),
    "tracking.request_timeout_s": positive(),
    "tracking.request_retries": non_negative(),
    "tracking.probe_interval_s": positive(),
    "tracking.outage_grace_s": non_negative(),
    "reward.max_length": Rule(lambda v: _number(v) and v >= 4, "at least 4 tokens"),
    "reward.epochs": positive(),
    "reward.dropout": Rule(lambda v: _number(v) and 0 <= v < 1, "in [0, 1), or null", True),
    "reward.center_rewards_coef": non_negative(),
    "reward.max_eval_comparisons": POSITIVE_INT,
    "reward.normalization_samples": Rule(lambda v: _number(v) and v >= 2, "at least 2"),
    "ppo.normalization_episodes": Rule(lambda v: _number(v) and v >= 2, "at least 2"),
    "ppo.total_episodes": POSITIVE_INT,
    "ppo.rollout_batch_size": POSITIVE_INT,
    "ppo.mini_batch_size": POSITIVE_INT,
    "ppo.ppo_epochs": POSITIVE_INT,
    "ppo.response_length": POSITIVE_INT,
    "ppo.min_response_length": non_negative(),
    "ppo.temperature": positive(),
    "ppo.kl_coef": non_negative(),
    "ppo.target_kl": positive(),
    "ppo.kl_horizon": POSITIVE_INT,
    "ppo.gamma": within(0.0, 1.0),
    "ppo.lam": within(0.0, 1.0),
    "ppo.cliprange": positive(),
    "ppo.cliprange_value": positive(),
    "ppo.vf_coef": non_negative(),
    "ppo.samples_table_rows": non_negative(),
    "model.lora.r": non_negative(),
    "model.lora.alpha": positive(),
    "model.lora.dropout": Rule(lambda v: _number(v) and 0 <= v < 1, "in [0, 1)"),
    "sft.max_length": Rule(lambda v: _number(v) and v >= 4, "at least 4 tokens"),
    "sft.epochs": positive(),
    "sft.max_eval_examples": POSITIVE_INT,
    "dpo.beta": positive(),
    "dpo.label_smoothing": Rule(lambda v: _number(v) and 0 <= v < 0.5, "in [0, 0.5)"),
    "dpo.rpo_alpha": non_negative(),
    "dpo.max_length": Rule(lambda v: _number(v) and v >= 4, "at least 4 tokens"),
    "dpo.epochs": positive(),
    "dpo.max_eval_pairs": POSITIVE_INT,
    "grpo.num_generations": Rule(lambda v: _number(v) and v >= 2, "at least 2 (a group)"),
    "grpo.beta": non_negative(),
    "grpo.num_iterations": POSITIVE_INT,
    "grpo.epsilon": positive(),
    "grpo.epsilon_high": positive("positive, or null", nullable=True),
    "grpo.mini_batch_size": positive("a positive integer, or null", nullable=True),
    "rloo.num_generations": Rule(lambda v: _number(v) and v >= 2, "at least 2 (a baseline)"),
    "rloo.kl_coef": non_negative(),
    "rloo.num_iterations": POSITIVE_INT,
    "rloo.cliprange": positive(),
    "rloo.mini_batch_size": positive("a positive integer, or null", nullable=True),
}
# What every online stage section (ppo, grpo, rloo) shares.
for _section in ("ppo", "grpo", "rloo"):
    RULES |= {
        f"{_section}.normalization_episodes": Rule(lambda v: _number(v) and v >= 2, "at least 2"),
        f"{_section}.total_episodes": POSITIVE_INT,
        f"{_section}.rollout_batch_size": POSITIVE_INT,
        f"{_section}.response_length": POSITIVE_INT,
        f"{_section}.min_response_length": non_negative(),
        f"{_section}.temperature": positive(),
        f"{_section}.samples_table_rows": non_negative(),
        f"{_section}.max_prompts": POSITIVE_INT,
        f"{_section}.max_prompt_length": POSITIVE_INT,
    }

# (keys, holds(values), what must hold): rules between keys.
RELATIONS = [
    (
        ("eval.generation.num_samples",),
        lambda n: _number(n) and n > 0 and n % 25 == 0,
        "a positive multiple of 25 (score_max_at_25 takes the maximum over groups of 25)",
    ),
    (
        ("eval.generation.min_new_tokens", "eval.generation.max_new_tokens"),
        lambda low, high: low <= high,
        "min_new_tokens <= max_new_tokens",
    ),
    (
        ("ppo.min_response_length", "ppo.response_length"),
        lambda low, high: low <= high,
        "ppo.min_response_length <= ppo.response_length (0 lets the stop token end a response "
        "anywhere)",
    ),
    (
        ("ppo.rollout_batch_size", "ppo.mini_batch_size"),
        lambda rollout, mini: rollout % mini == 0,
        "ppo.rollout_batch_size a multiple of ppo.mini_batch_size",
    ),
    (
        ("grpo.rollout_batch_size", "grpo.num_generations"),
        lambda rollout, k: rollout % k == 0,
        "grpo.rollout_batch_size a multiple of grpo.num_generations (whole groups)",
    ),
    (
        ("rloo.rollout_batch_size", "rloo.num_generations"),
        lambda rollout, k: rollout % k == 0,
        "rloo.rollout_batch_size a multiple of rloo.num_generations (whole groups)",
    ),
    (
        ("grpo.min_response_length", "grpo.response_length"),
        lambda low, high: low <= high,
        "grpo.min_response_length <= grpo.response_length",
    ),
    (
        ("rloo.min_response_length", "rloo.response_length"),
        lambda low, high: low <= high,
        "rloo.min_response_length <= rloo.response_length",
    ),
    (
        ("scorer.max_line_chars", "scorer.max_line_length"),
        lambda chars, length: chars > length,
        "scorer.max_line_chars > scorer.max_line_length",
    ),
]

_ABSENT = object()


def validate_config(cfg: DictConfig) -> None:
    """Refuse values out of range, naming each key, before any work (see ConfigError)."""
    from omegaconf import OmegaConf

    if OmegaConf.is_missing(cfg.model, "pretrained"):
        raise ConfigError(
            f"model={cfg.model.name} needs model.pretrained: set it to a hub id, a local "
            "directory or an MLflow model URI, e.g. `phf model=pretrained "
            "model.pretrained=runs:/<run id>/model` (or EleutherAI/pythia-70m, /path/to/model)"
        )
    problems = []
    for key, rule in RULES.items():
        value = OmegaConf.select(cfg, key, default=_ABSENT)
        if value is _ABSENT or (value is None and rule.nullable):
            continue
        if not rule.check(value):
            problems.append(f"{key}={value!r} must be {rule.must_be}")
    for keys, holds, what in RELATIONS:
        values = [OmegaConf.select(cfg, key, default=_ABSENT) for key in keys]
        if _ABSENT in values or any(v is None for v in values):
            continue
        if not all(_number(v) for v in values) or not holds(*values):
            shown = ", ".join(f"{k}={v!r}" for k, v in zip(keys, values, strict=True))
            problems.append(f"{shown}: needs {what}")
    if problems:
        raise ConfigError(
            "invalid config values:\n  - "
            + "\n  - ".join(problems)
            + "\nset them on the command line (phf key=value) or in the conf/ file that sets them"
        )


# ------------------------------------------------------------------------- by stage
# The objective keys each objective reads: a run logs only those as params. (A stage's own
# config section is named by its stage class: phf/stages/, ``section``.)
OBJECTIVE_KEYS: dict[str, tuple[str, ...]] = {
    "filtering": ("threshold",),
    "conditional": ("threshold", "drop_token_fraction"),
    "unlikelihood": ("threshold", "alpha"),
    "awr": ("alpha", "beta"),
    "rwr": ("beta",),
}
# Where and how fast a run goes, not what it computes: a resumed run may change them.
RESUME_IGNORED = ("hardware", "tracking", "data", "train.resume", "eval.kl_reference_timeout_min")


def stage_params(
    cfg: DictConfig, own_section: str | None, stage_sections: Iterable[str]
) -> dict[str, Any]:
    """The config as the run's params: of the ``stage_sections`` (every stage's own section),
    only ``own_section``; only the objective keys its objective reads; tracking settings are
    where it is recorded, not params."""
    from omegaconf import OmegaConf

    container = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    for section in set(stage_sections) - {own_section}:
        container.pop(section, None)
    objective = container["objective"]
    keep = ("name", "stage", *OBJECTIVE_KEYS.get(objective["name"], ()))
    container["objective"] = {key: objective[key] for key in keep}
    container.pop("tracking", None)
    return container


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(tree, dict):
        return {prefix.rstrip("."): tree}
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        flat |= (
            _flat(value, f"{prefix}{key}.")
            if isinstance(value, dict) and value
            else {f"{prefix}{key}": value}
        )
    return flat


def resume_differences(saved: DictConfig, current: DictConfig) -> list[str]:
    """The keys whose values differ between a checkpoint's config and this run's ("train.lr:
    1000000.0 in the checkpoint, 0.002 now"), RESUME_IGNORED aside. Both configs have their
    ``sweep:<objective>`` references resolved (phf.run resolves them before comparing)."""
    from omegaconf import OmegaConf

    def flat(cfg: DictConfig) -> dict[str, Any]:
        return _flat(OmegaConf.to_container(cfg, resolve=True, enum_to_str=True))

    before, now = flat(saved), flat(current)
    differences = []
    for key in sorted(set(before) | set(now)):
        if key in RESUME_IGNORED or key.startswith(tuple(f"{p}." for p in RESUME_IGNORED)):
            continue
        old, new = before.get(key, "<absent>"), now.get(key, "<absent>")
        if old != new:
            differences.append(f"{key}: {old!r} in the checkpoint, {new!r} now")
    return differences
