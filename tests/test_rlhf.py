"""End-to-end runs of the RLHF stages on the real config, shrunk: objective=reward on every
preference schema, objective=ppo against a scorer and a reward model, the pipeline chained
through MLflow, and the bad-input paths."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import mlflow
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    AutoModelForSequenceClassification,
    GPT2Config,
    GPT2ForSequenceClassification,
    PreTrainedTokenizerFast,
)

from phf.data.corpus import DatasetError
from phf.hardware import Placement
from phf.reward_model import REWARD_CONFIG_KEY, RewardModel, score_texts
from phf.run import execute
from phf.tokenizer import load_tokenizer
from phf.tracking import download_model
from tests.conftest import TINY_RUN, multirun_command

CPU = Placement(torch.device("cpu"), torch.float32)

# PPO in seconds: two rollouts of 8 short responses, one evaluation after each.
TINY_PPO = [
    "objective=ppo",
    "ppo.rollout_batch_size=8",
    "ppo.mini_batch_size=4",
    "ppo.ppo_epochs=2",
    "ppo.response_length=8",
    "ppo.min_response_length=4",
    "ppo.normalization_episodes=16",
    "eval.kl_samples=8",
]


def runs_by_objective(tracking_uri: str) -> dict[str, object]:
    mlflow.set_tracking_uri(tracking_uri)
    runs = mlflow.search_runs(search_all_experiments=True)
    children = runs[runs["tags.objective"].notna()]
    return {row["tags.objective"]: row for _, row in children.iterrows()}


@pytest.mark.slow
def test_reward_model_trains_on_builtin_pairs_and_records_everything(
    run_dir: Path, tracking_uri: str, compose_cfg
) -> None:
    cfg = compose_cfg([*TINY_RUN, "objective=reward", f"tracking.uri={tracking_uri}"])
    accuracy = execute(cfg, run_dir / "out", [])
    assert 0.0 <= accuracy <= 1.0

    run = runs_by_objective(tracking_uri)["reward"]
    assert run.status == "FINISHED" and run["tags.stage"] == "reward"
    for metric in ("train/loss", "train/accuracy", "eval/loss", "eval/accuracy", "eval/margin"):
        assert f"metrics.{metric}" in run
    assert run["metrics.data/train_comparisons"] > 500  # builtin toxicity pairs
    assert run["metrics.data/test_comparisons"] > 50
    assert run["metrics.eval/accuracy"] == pytest.approx(accuracy)
    client = mlflow.MlflowClient()
    history = client.get_metric_history(run.run_id, "eval/accuracy")
    assert [m.step for m in history] == [0, 1, 2]  # optimizer steps
    seen = client.get_metric_history(run.run_id, "comparisons_seen")
    assert [(m.step, m.value) for m in seen] == [(0, 0), (1, 4), (2, 8)]  # 4 per step

    # The artifact is a reward model in the standard format, with the normalisation that makes
    # rewards on its normalisation texts (train responses: the trunk is random) mean 0, std 1.
    model, tokenizer = RewardModel.load(f"runs:/{run.run_id}/model")
    config = json.loads((run_dir / "out" / "model" / "config.json").read_text())
    meta = config[REWARD_CONFIG_KEY]
    assert meta["normalized_on"] == "train responses"
    assert model.gain == pytest.approx(meta["gain"]) and model.gain > 0
    assert run["metrics.reward/gain"] == pytest.approx(model.gain)
    # Hugging Face's own class loads it and reads the same raw rewards (right padding).
    hf = AutoModelForSequenceClassification.from_pretrained(
        download_model(f"runs:/{run.run_id}/model")
    )
    ids = model.encode("A prompt,", " and a response.", tokenizer)
    with torch.no_grad():
        raw = model.eval()(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long))
        assert hf.eval()(input_ids=torch.tensor([ids])).logits[0, 0] == pytest.approx(
            float(raw), abs=1e-5
        )


@pytest.mark.slow
@pytest.mark.parametrize(
    ("schema", "row"),
    [
        ("pairwise", {"prompt": "Q: say hi\nA:", "chosen": " hello there", "rejected": " go away"}),
        (
            "hh",
            {
                "chosen": "\n\nHuman: say hi\n\nAssistant: hello there",
                "rejected": "\n\nHuman: say hi\n\nAssistant: go away",
            },
        ),
        (
            "best_of_n",
            {"query": "say hi", "sample0": "no", "sample1": "hello", "sample2": "bye", "best": 1},
        ),
    ],
)
def test_reward_model_reads_each_preference_schema_from_a_local_file(
    run_dir: Path, tracking_uri: str, compose_cfg, schema: str, row: dict
) -> None:
    data = run_dir / f"{schema}.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for _ in range(30)))
    cfg = compose_cfg(
        [*TINY_RUN, "objective=reward", f"reward.dataset={data}", f"tracking.uri={tracking_uri}"]
    )
    execute(cfg, run_dir / "out", [])
    run = runs_by_objective(tracking_uri)["reward"]
    # Every 10th row of a single file is held out.
    assert run["metrics.data/train_comparisons"] == 27
    assert run["metrics.data/test_comparisons"] == 3


@pytest.mark.slow
def test_an_over_long_comparison_is_counted_not_silently_kept(
    run_dir: Path, tracking_uri: str, compose_cfg, caplog: pytest.LogCaptureFixture
) -> None:
    data = run_dir / "pairs.jsonl"
    short = {"prompt": "p", "chosen": "short", "rejected": "also short"}
    long = {"prompt": "word " * 200, "chosen": "a", "rejected": "b"}
    # Rows 10 and 20 are the test split: one short, one long; train: 18 short, 2 long.
    rows = [short] * 19 + [long] * 3
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = compose_cfg(
        [
            *TINY_RUN,
            "objective=reward",
            f"reward.dataset={data}",
            "reward.max_length=32",
            "reward.overlong=drop",
            f"tracking.uri={tracking_uri}",
        ]
    )
    execute(cfg, run_dir / "out", [])
    assert "2 of 20 comparisons exceed reward.max_length=32 tokens: 0 truncated" in caplog.text
    assert "1 of 2 comparisons exceed reward.max_length=32 tokens: 0 truncated" in caplog.text
    run = runs_by_objective(tracking_uri)["reward"]
    assert run["metrics.data/dropped"] == 3 and run["metrics.data/train_comparisons"] == 18


@pytest.mark.slow
@pytest.mark.parametrize(
    ("row", "message"),
    [
        (
            {"query": "q", "sample0": "a", "sample1": "b", "best": 2},
            "'best' is 2 but the row has 2",
        ),
        ({"prompt": "q", "chosen": "a"}, "missing 'rejected'"),
        ({"prompt": "q", "chosen": "a", "rejected": "  "}, "response 1 is empty"),
        ({"text": "q"}, "unknown preference schema"),
    ],
)
def test_a_bad_preference_row_fails_the_run_naming_the_row(
    run_dir: Path, tracking_uri: str, compose_cfg, row: dict, message: str
) -> None:
    good = {"prompt": "q", "chosen": "a", "rejected": "b"}
    data = run_dir / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in [good, good, row]))
    cfg = compose_cfg(
        [*TINY_RUN, "objective=reward", f"reward.dataset={data}", f"tracking.uri={tracking_uri}"]
    )
    with pytest.raises(DatasetError, match=message) as error:
        execute(cfg, run_dir / "out", [])
    assert f"{data}, row 3" in str(error.value)
    assert runs_by_objective(tracking_uri)["reward"].status == "FAILED"


@pytest.mark.slow
def test_ppo_against_the_scorer_logs_the_ecosystems_metrics(
    run_dir: Path, tracking_uri: str, compose_cfg
) -> None:
    cfg = compose_cfg([*TINY_RUN, *TINY_PPO, f"tracking.uri={tracking_uri}"])
    execute(cfg, run_dir / "out", [])
    run = runs_by_objective(tracking_uri)["ppo"]
    assert run.status == "FINISHED" and run["tags.stage"] == "ppo"
    for metric in (
        "objective/kl",
        "objective/entropy",
        "objective/scores",
        "objective/rlhf_reward",
        "policy/approxkl",
        "policy/clipfrac",
        "loss/policy",
        "loss/value",
        "val/ratio",
        "time/generation_share",
        "score",
        "kl",
    ):
        assert f"metrics.{metric}" in run, metric
    client = mlflow.MlflowClient()
    assert [m.step for m in client.get_metric_history(run.run_id, "objective/kl")] == [1, 2]
    episodes = client.get_metric_history(run.run_id, "episodes")
    assert [(m.step, m.value) for m in episodes] == [(0, 0), (1, 8), (2, 16)]
    # Evaluated before the first rollout and after each; KL is 0 from the initial policy itself.
    kl = client.get_metric_history(run.run_id, "kl")
    assert [m.step for m in kl] == [0, 1, 2] and kl[0].value == pytest.approx(0.0, abs=1e-5)
    rollouts = [a.path for a in client.list_artifacts(run.run_id, "rollouts")]
    assert rollouts == ["rollouts/episodes_0000000008.json", "rollouts/episodes_0000000016.json"]
    table = mlflow.artifacts.load_dict(f"runs:/{run.run_id}/{rollouts[-1]}")
    assert table["columns"] == ["sample", "prompt", "response", "score"]
    assert len(table["data"]) == 8
    # The value head is kept with the output directory's model (and its checkpoints).
    assert (run_dir / "out" / "model" / "value_head.safetensors").is_file()


def other_tokenizer(directory: Path) -> PreTrainedTokenizerFast:
    """A word-level tokenizer unlike the policy's BPE: ids and vocabulary differ."""
    words = ["<eos>", "<unk>", "a", "and", "he", "in", "is", "it", "of", "that", "the", "to", "you"]
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token="<eos>", pad_token="<eos>", unk_token="<unk>"
    )
    fast.save_pretrained(directory)
    return fast


@pytest.mark.slow
def test_ppo_against_a_reward_model_with_another_tokenizer(
    run_dir: Path, tracking_uri: str, compose_cfg
) -> None:
    directory = run_dir / "reward_model"
    tokenizer = other_tokenizer(directory)
    trunk = GPT2ForSequenceClassification(
        GPT2Config(
            vocab_size=len(tokenizer),
            n_layer=1,
            n_head=2,
            n_embd=16,
            n_positions=64,
            num_labels=1,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    cfg = compose_cfg([*TINY_RUN, "objective=reward"])
    RewardModel(trunk, tokenizer, max_length=64).save(directory, tokenizer, cfg, {})

    ppo_cfg = compose_cfg(
        [*TINY_RUN, *TINY_PPO, f"ppo.reward_model={directory}", f"tracking.uri={tracking_uri}"]
    )
    execute(ppo_cfg, run_dir / "out", [])
    run = runs_by_objective(tracking_uri)["ppo"]
    assert run.status == "FINISHED"
    # The policy's text, handed over as text, re-tokenized by the reward model's own
    # tokenizer: the rewards PPO trained on are that model's on those tokens.
    policy_tokenizer = load_tokenizer(str(run_dir / "out" / "model"))
    reward_model, loaded = RewardModel.load(str(directory))
    table = mlflow.artifacts.load_dict(f"runs:/{run.run_id}/rollouts/episodes_0000000016.json")
    rows = [dict(zip(table["columns"], row, strict=True)) for row in table["data"]]
    expected = score_texts(
        reward_model, loaded, [r["prompt"] for r in rows], [r["response"] for r in rows], 8, CPU
    )
    assert len(set(expected.tolist())) > 1  # the reward model tells the responses apart
    assert policy_tokenizer.get_vocab() != loaded.get_vocab()
    scores = torch.tensor([r["score"] for r in rows])
    # The table holds the normalised reward: an affine map of the raw one, the same for all.
    fit = torch.linalg.lstsq(
        torch.stack([expected, torch.ones_like(expected)], dim=1), scores[:, None]
    ).solution.squeeze(1)
    torch.testing.assert_close(fit[0] * expected + fit[1], scores, atol=1e-3, rtol=1e-3)
    assert float(fit[0]) > 0


@pytest.mark.slow
def test_a_reward_model_that_is_not_one_is_refused_clearly(
    run_dir: Path, tracking_uri: str, compose_cfg
) -> None:
    mle_cfg = compose_cfg([*TINY_RUN, f"tracking.uri={tracking_uri}"])
    execute(mle_cfg, run_dir / "mle", [])
    cfg = compose_cfg(
        [
            *TINY_RUN,
            *TINY_PPO,
            f"ppo.reward_model={run_dir / 'mle' / 'model'}",
            f"tracking.uri={tracking_uri}",
        ]
    )
    with pytest.raises(FileNotFoundError, match="is not a reward model"):
        execute(cfg, run_dir / "out", [])


@pytest.mark.slow
def test_the_pipeline_chains_pretraining_reward_and_ppo_through_mlflow(
    run_dir: Path, tracking_uri: str
) -> None:
    result = subprocess.run(
        multirun_command(run_dir, "experiment=rlhf_pipeline", *TINY_PPO[1:]),
        cwd=run_dir,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    runs = runs_by_objective(tracking_uri)
    assert set(runs) == {"mle", "reward", "ppo"}
    assert all(run.status == "FINISHED" for run in runs.values())
    mle, reward, ppo = runs["mle"].run_id, runs["reward"].run_id, runs["ppo"].run_id
    # Each link is tagged and written in the run's MLflow note, which the UI shows.
    assert "tags.phf.lineage.model.pretrained" not in runs["mle"] or (
        not isinstance(runs["mle"]["tags.phf.lineage.model.pretrained"], str)
    )
    assert runs["reward"]["tags.phf.lineage.model.pretrained"] == mle
    assert runs["ppo"]["tags.phf.lineage.model.pretrained"] == mle
    assert runs["ppo"]["tags.phf.lineage.ppo.reward_model"] == reward
    assert f"runs/{reward}" in runs["ppo"]["tags.mlflow.note.content"]
    # Resolved before the run opened: its params are what it ran with.
    assert runs["ppo"]["params.ppo.reward_model"] == f"runs:/{reward}/model"
    # The reward model was normalised on samples of the MLE policy it started from.
    config = json.loads((download_model(f"runs:/{reward}/model") / "config.json").read_text())
    assert config[REWARD_CONFIG_KEY]["normalized_on"] == f"samples of runs:/{mle}/model"
    assert ppo


@pytest.mark.slow
def test_reward_model_reaches_80_percent_on_builtin_toxicity_pairs(
    run_dir: Path, tracking_uri: str, compose_cfg
) -> None:
    """The issue's bar: held-out accuracy >= 0.8 on scorer-derived pairs in a few CPU minutes
    (50 steps of 32 pairs, the default tiny model from scratch)."""
    cfg = compose_cfg(
        ["objective=reward", "hardware=cpu", "train.max_steps=50", f"tracking.uri={tracking_uri}"]
    )
    accuracy = execute(cfg, run_dir / "out", [])
    assert accuracy >= 0.8
