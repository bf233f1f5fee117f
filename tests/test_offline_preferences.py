"""Offline preference learning: the DPO, IPO and hinge losses and TRL's metrics on hand-built
numbers, response-only log-probabilities under either padding, the cached reference, the SFT
loss's mask, LoRA, the data (best-of-N pairs, identical pairs, built-in pairs without the
prompt's text), and sft and dpo runs end to end, chained, resumed and data-parallel."""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import mlflow
import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file
from transformers import GPT2Config, GPT2LMHeadModel

from phf.data.corpus import iter_documents
from phf.data.examples import Example, encode_example, example_batch
from phf.data.preferences import Comparison, as_pairs, builtin_comparisons, load_comparisons
from phf.hardware import Placement
from phf.lora import base_weights, merged, trainable, with_lora
from phf.losses.preference import chosen_nll, dpo_loss, dpo_metrics
from phf.run import execute
from phf.sequences import continuation_logprobs
from phf.stages.sft import response_nll
from phf.tokenizer import load_tokenizer
from tests.conftest import TINY_RUN, multirun_command

CPU = Placement(device=torch.device("cpu"), dtype=torch.float32)


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


# --- the losses and metrics, by hand ----------------------------------------------------------

# Two pairs: log-probabilities of the policy and of the reference, chosen and rejected.
PC, PR = torch.tensor([-1.0, -3.0]), torch.tensor([-2.0, -1.0])
RC, RR = torch.tensor([-1.5, -2.0]), torch.tensor([-1.5, -1.5])
H = [(-1.0 + 1.5) - (-2.0 + 1.5), (-3.0 + 2.0) - (-1.0 + 1.5)]  # [1.0, -1.5]


def test_dpo_loss_by_hand() -> None:
    losses = dpo_loss(PC, PR, RC, RR, beta=0.5)
    assert losses.tolist() == pytest.approx([-log_sigmoid(0.5 * h) for h in H])


def test_conservative_dpo_mixes_in_the_flipped_label() -> None:
    losses = dpo_loss(PC, PR, RC, RR, beta=0.5, label_smoothing=0.1)
    expected = [-0.9 * log_sigmoid(0.5 * h) - 0.1 * log_sigmoid(-0.5 * h) for h in H]
    assert losses.tolist() == pytest.approx(expected)


def test_ipo_and_hinge_losses_by_hand() -> None:
    ipo = dpo_loss(PC, PR, RC, RR, beta=0.5, loss_type="ipo")
    assert ipo.tolist() == pytest.approx([(h - 1.0) ** 2 for h in H])  # 1 / (2 beta) = 1
    hinge = dpo_loss(PC, PR, RC, RR, beta=0.5, loss_type="hinge")
    assert hinge.tolist() == pytest.approx([max(0.0, 1 - 0.5 * h) for h in H])
    with pytest.raises(ValueError, match="sigmoid, ipo, hinge"):
        dpo_loss(PC, PR, RC, RR, beta=0.5, loss_type="kto")


def test_rpos_term_is_the_chosen_nll_per_token() -> None:
    # Chosen responses of 2 and 4 tokens with summed log-probabilities -1 and -3.
    nll = chosen_nll(PC, torch.tensor([2, 4]))
    assert nll.tolist() == pytest.approx([0.5, 0.75])


def test_trl_metrics_by_hand() -> None:
    metrics = {k: float(v) / 2 for k, v in dpo_metrics(PC, PR, RC, RR, beta=0.5).items()}
    chosen = [0.5 * (-1.0 + 1.5), 0.5 * (-3.0 + 2.0)]  # [0.25, -0.5]
    rejected = [0.5 * (-2.0 + 1.5), 0.5 * (-1.0 + 1.5)]  # [-0.25, 0.25]
    assert metrics["rewards/chosen"] == pytest.approx(sum(chosen) / 2)
    assert metrics["rewards/rejected"] == pytest.approx(sum(rejected) / 2)
    assert metrics["rewards/accuracies"] == 0.5  # the first pair only
    assert metrics["rewards/margins"] == pytest.approx((0.5 - 0.75) / 2)
    assert metrics["logps/chosen"] == -2.0 and metrics["logps/rejected"] == -1.5


# --- log-probabilities of responses ---------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("builtin")


@pytest.fixture(scope="module")
def tiny_lm(tokenizer):
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tokenizer), n_layer=1, n_head=2, n_embd=32, n_positions=64)
    return GPT2LMHeadModel(config).eval()


def forward(model, input_ids, attention):
    from phf.models import position_ids

    return model(
        input_ids=input_ids, attention_mask=attention, position_ids=position_ids(attention)
    ).logits


def test_response_logprobs_sum_the_response_only_under_either_padding(tiny_lm, tokenizer) -> None:
    examples = [
        encode_example("A long prompt with words", " and a reply.", tokenizer, 64),
        encode_example("Hi", " there friend, how are you", tokenizer, 64),
    ]
    by_hand = []
    with torch.no_grad():
        for example in examples:
            ids = torch.tensor([example.ids])
            logp = torch.log_softmax(tiny_lm(input_ids=ids).logits[0, :-1], dim=-1)
            targets = ids[0, 1:]
            token_logp = logp.gather(1, targets[:, None]).squeeze(1)
            by_hand.append(float(token_logp[example.response_start - 1 :].sum()))
        results = []
        for left in (False, True):
            batch = example_batch(examples, tokenizer.pad_token_id, CPU.device, left=left)
            results.append(continuation_logprobs(tiny_lm, batch, CPU))
    assert results[0].tolist() == pytest.approx(by_hand, abs=1e-4)
    assert results[1].tolist() == pytest.approx(by_hand, abs=1e-4)


def test_the_sft_loss_masks_the_prompt(tiny_lm, tokenizer) -> None:
    example = encode_example("Prompt words here", " the response", tokenizer, 64)
    with torch.no_grad():
        nll, count = response_nll(tiny_lm, [example], tokenizer.pad_token_id, CPU, False)
        all_nll, all_count = response_nll(tiny_lm, [example], tokenizer.pad_token_id, CPU, True)
        ids = torch.tensor([example.ids])
        logp = torch.log_softmax(tiny_lm(input_ids=ids).logits[0, :-1], dim=-1)
        token_nll = -logp.gather(1, ids[0, 1:, None]).squeeze(1)
    assert int(count) == len(example.ids) - example.response_start  # response + final EOS
    assert float(nll) == pytest.approx(
        float(token_nll[example.response_start - 1 :].sum()), abs=1e-4
    )
    assert int(all_count) == len(example.ids) - 1 and float(all_nll) == pytest.approx(
        float(token_nll.sum()), abs=1e-4
    )


def test_a_long_example_loses_its_prompts_start(tokenizer) -> None:
    from phf.data.examples import EncodingCounts

    counts = EncodingCounts()
    long = encode_example("word " * 100, " the end", tokenizer, 16, counts)
    assert len(long.ids) == 16 and long.ids[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(long.ids[long.response_start : -1]) == " the end"
    assert encode_example("p", " word" * 30, tokenizer, 16, counts) is None  # response too long
    assert (counts.truncated, counts.dropped) == (1, 1)


# --- LoRA ------------------------------------------------------------------------------------


def test_lora_trains_only_adapters_and_merges_to_the_same_logits(tiny_lm, tokenizer) -> None:
    import copy

    lora = OmegaConf.create({"r": 4, "alpha": 8.0, "dropout": 0.0, "target_modules": None})
    model = with_lora(copy.deepcopy(tiny_lm), lora, "CAUSAL_LM")
    names = trainable(model)
    assert names and all("lora_" in n for n in names)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_()  # as if trained
        ids = torch.randint(0, len(tokenizer), (2, 10))
        with_adapters = model(input_ids=ids).logits
        with base_weights(model):
            base = model(input_ids=ids).logits
        assert torch.allclose(base, tiny_lm(input_ids=ids).logits, atol=1e-5)
        assert not torch.allclose(with_adapters, base, atol=1e-3)
        plain = merged(model)
        assert isinstance(plain, GPT2LMHeadModel)
        assert torch.allclose(plain(input_ids=ids).logits, with_adapters, atol=1e-4)


# --- the data ---------------------------------------------------------------------------------


def test_a_best_of_n_row_gives_n_minus_one_pairs() -> None:
    comparison = Comparison("q", ("a", "b", "c", "d"), 2, 0.0, "row 1")
    assert as_pairs([comparison]) == [
        ("q", "c", "a", "row 1"),
        ("q", "c", "b", "row 1"),
        ("q", "c", "d", "row 1"),
    ]


def test_identical_responses_are_left_out_and_counted(tmp_path: Path, caplog) -> None:
    rows = [{"prompt": "q", "chosen": "a", "rejected": "b"}] * 8 + [
        {"prompt": "q", "chosen": "same", "rejected": "same"}
    ] * 2
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    section = OmegaConf.create({"dataset": str(path), "format": "auto", "test_split": "test"})
    train = load_comparisons(section, None, "train", 0, "dpo.dataset")
    assert len(train) == 8  # rows 1-9 less row 9 (identical); row 10 is the test split's
    assert "1 rows whose responses are identical were left out (first: " in caplog.text
    assert "pairs.jsonl, row 9" in caplog.text


@pytest.mark.parametrize("task", ["toxicity", "pii", "pep8"])
def test_no_builtin_pair_has_its_response_in_its_prompt(task: str) -> None:
    for split in ("train", "test"):
        pairs = builtin_comparisons(
            iter_documents(task, "builtin", split), 0.0 if task != "toxicity" else 0.5, seed=0
        )
        assert len(pairs) > 50
        for pair in pairs:
            for response in pair.responses:
                assert response.strip() not in pair.prompt, (pair.where, response)


# --- end to end ------------------------------------------------------------------------------

TINY_SFT = ["objective=sft", "train.batch_size=4", "train.max_steps=3", "sft.max_length=48"]
TINY_DPO = ["objective=dpo", "train.batch_size=4", "train.max_steps=3", "dpo.max_length=48"]


@pytest.mark.slow
@pytest.mark.parametrize("lora", [False, True])
def test_sft_and_dpo_train_from_a_model_and_log_trls_metrics(
    run_dir: Path, tracking_uri: str, compose_cfg, mle_model: Path, lora: bool
) -> None:
    common = [*TINY_RUN, f"model.pretrained={mle_model}", f"tracking.uri={tracking_uri}"]
    if lora:
        common.append("model.lora.r=4")
    execute(compose_cfg([*common, *TINY_SFT]), run_dir / "sft", [])
    execute(compose_cfg([*common, *TINY_DPO]), run_dir / "dpo", [])
    mlflow.set_tracking_uri(tracking_uri)
    runs = mlflow.search_runs(search_all_experiments=True).set_index("tags.stage")
    assert set(runs.status) == {"FINISHED"}
    for metric in ("train/loss", "eval/response_loss", "score", "kl", "eval/lm_loss"):
        assert f"metrics.{metric}" in runs.columns and not math.isnan(
            runs.loc["sft", f"metrics.{metric}"]
        )
    for metric in (
        "rewards/chosen",
        "rewards/rejected",
        "rewards/accuracies",
        "rewards/margins",
        "logps/chosen",
        "logps/rejected",
        "nll_loss",
    ):
        assert not math.isnan(runs.loc["dpo", f"metrics.{metric}"]), metric
        assert not math.isnan(runs.loc["dpo", f"metrics.eval/{metric}"]), metric
    history = mlflow.MlflowClient().get_metric_history(runs.loc["dpo", "run_id"], "kl")
    assert abs(history[0].value) < 1e-3  # the policy starts as its reference
    # The published models are plain from_pretrained models, LoRA merged; they changed.
    before = load_file(mle_model / "model.safetensors")
    for stage in ("sft", "dpo"):
        after = load_file(run_dir / stage / "model" / "model.safetensors")
        assert not (run_dir / stage / "model" / "adapter_config.json").exists()
        changed = [k for k in before if not torch.equal(before[k], after[k])]
        assert changed, stage
        if lora:  # only the adapted layers (c_attn) moved, merged into the weights
            assert all("c_attn" in k for k in changed), changed
    if lora:
        assert (
            run_dir / "dpo" / "checkpoints" / "step_000003" / "adapter_model.safetensors"
        ).is_file()


@pytest.mark.slow
def test_the_sft_dpo_pipeline_chains_through_mlflow(run_dir: Path, tracking_uri: str) -> None:
    result = subprocess.run(
        multirun_command(
            run_dir,
            "experiment=sft_dpo_pipeline",
            "train.batch_size=4",
            "sft.max_length=48",
            "dpo.max_length=48",
            "eval.kl_samples=8",
        ),
        cwd=run_dir,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    mlflow.set_tracking_uri(tracking_uri)
    runs = mlflow.search_runs(search_all_experiments=True)
    runs = runs[runs["tags.sweep"] != "parent"].set_index("tags.objective")
    assert set(runs.index) == {"mle", "sft", "dpo"} and set(runs.status) == {"FINISHED"}
    mle, sft = runs.loc["mle", "run_id"], runs.loc["sft", "run_id"]
    assert runs.loc["sft", "tags.phf.lineage.model.pretrained"] == mle
    assert runs.loc["dpo", "tags.phf.lineage.dpo.policy"] == sft
    assert runs.loc["dpo", "tags.phf.lineage.eval.kl_reference"] == mle
    assert f"runs/{sft}" in runs.loc["dpo", "tags.mlflow.note.content"]


@pytest.mark.slow
def test_cached_reference_logprobs_equal_fresh_ones(compose_cfg, mle_model: Path) -> None:
    from phf.distributed import SINGLE_PROCESS
    from phf.stages.dpo import DPOStage, logprobs_of

    cfg = compose_cfg([*TINY_RUN, *TINY_DPO, f"model.pretrained={mle_model}", "eval.kl_samples=8"])
    stage = DPOStage.build(cfg, CPU, SINGLE_PROCESS)
    stage.step()  # the policy moves; the cache is the reference's
    from transformers import AutoModelForCausalLM

    reference = AutoModelForCausalLM.from_pretrained(mle_model)
    examples = [e for pair in stage.train_pairs[:6] for e in pair]
    fresh = logprobs_of(reference, examples, stage.tokenizer.pad_token_id, CPU, 4).view(-1, 2)
    torch.testing.assert_close(stage.reference_train[:6], fresh, atol=1e-4, rtol=1e-5)
    moved = logprobs_of(stage.model, examples, stage.tokenizer.pad_token_id, CPU, 4).view(-1, 2)
    assert not torch.allclose(moved, fresh, atol=1e-4)
    assert isinstance(examples[0], Example)


@pytest.mark.slow
def test_rpo_adds_alpha_times_the_chosen_nll_per_token(compose_cfg, mle_model: Path) -> None:
    from phf.distributed import SINGLE_PROCESS
    from phf.stages.dpo import DPOStage, logprobs_of

    cfg = compose_cfg([*TINY_RUN, *TINY_DPO, f"model.pretrained={mle_model}", "eval.kl_samples=8"])
    stage = DPOStage.build(cfg, CPU, SINGLE_PROCESS)
    pairs, reference = stage.train_pairs[:4], stage.reference_train[:4]
    with torch.no_grad():
        plain, metrics = stage.pair_terms(stage.model, pairs, reference)
        stage.cfg.dpo.rpo_alpha = 0.5
        rpo, _ = stage.pair_terms(stage.model, pairs, reference)
    chosen = [c for c, _ in pairs]
    logps = logprobs_of(stage.model, chosen, stage.tokenizer.pad_token_id, CPU, 4)
    tokens = torch.tensor([len(c.ids) - c.response_start for c in chosen])
    nll = (-logps / tokens).sum()
    torch.testing.assert_close(metrics["nll_loss"], nll, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(rpo, plain + 0.5 * nll, atol=1e-4, rtol=1e-5)
