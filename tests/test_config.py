"""Composition: every option of every group composes; bad keys and values fail at compose time."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ConfigKeyError, MissingMandatoryValue, ValidationError

from phf.config import register_schemas
from tests.conftest import CONF_DIR

GROUPS = ["task", "objective", "model", "scorer", "hardware", "tracking"]


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


@pytest.mark.parametrize(
    "group,option", [(group, option) for group in GROUPS for option in options(group)]
)
def test_every_option_composes(compose_cfg, group: str, option: str) -> None:
    overrides = [f"{group}={option}"]
    if (group, option) == ("model", "pretrained"):
        overrides.append("model.pretrained=some/model")
    cfg = compose_cfg(overrides)
    assert cfg[group].name == option if group != "tracking" else "uri" in cfg.tracking
    stages = {s: s for s in ("reward", "ppo", "sft", "dpo", "grpo", "rloo")}
    expected = stages.get(option, "pretrain") if group == "objective" else "pretrain"
    assert cfg.objective.stage.value == expected


def test_default_run_is_tiny_mle_on_toxicity(compose_cfg) -> None:
    cfg = compose_cfg()
    assert (cfg.task.name, cfg.objective.name, cfg.model.name) == ("toxicity", "mle", "tiny")
    assert (cfg.scorer.name, cfg.hardware.name, cfg.tracking.uri) == ("profanity", "auto", None)
    assert cfg.model.architecture.n_positions >= cfg.train.block_size


def test_unknown_option_lists_the_valid_choices(compose_cfg) -> None:
    with pytest.raises(Exception, match=r"(?s)Could not find 'task/nope'.*toxicity"):
        compose_cfg(["task=nope"])


def test_misspelt_key_fails_at_compose_time(compose_cfg) -> None:
    with pytest.raises(ConfigCompositionException, match="lrr"):
        compose_cfg(["train.lrr=0.1"])


def test_misspelt_key_in_a_group_option_fails(compose_cfg) -> None:
    with pytest.raises(ConfigCompositionException, match="task.blocksize"):
        compose_cfg(["task.blocksize=3"])


def test_option_file_with_an_unknown_key_fails(tmp_path) -> None:
    """A typo inside a YAML option (not only on the command line) is caught by the schema."""
    conf = tmp_path / "conf"
    shutil.copytree(CONF_DIR, conf)
    (conf / "task" / "typo.yaml").write_text("name: typo\nhit_treshold: 0.5\n")
    register_schemas()
    with (
        initialize_config_dir(config_dir=str(conf), version_base="1.3"),
        pytest.raises((ConfigCompositionException, ConfigKeyError), match="hit_treshold"),
    ):
        compose(config_name="config", overrides=["task=typo"])


def test_wrong_type_fails_at_compose_time(compose_cfg) -> None:
    with pytest.raises((ConfigCompositionException, ValidationError), match="batch_size"):
        compose_cfg(["train.batch_size=many"])


def test_stage_that_does_not_exist_is_refused(compose_cfg) -> None:
    with pytest.raises(ConfigCompositionException) as error:
        compose_cfg(["objective.stage=kto"])
    # Hydra's message names the override; its cause lists the valid stages.
    assert "objective.stage=kto" in str(error.value)
    assert "pretrain" in str(error.value.__cause__) and "ppo" in str(error.value.__cause__)


def test_pretrained_model_requires_a_path(compose_cfg) -> None:
    cfg = compose_cfg(["model=pretrained"])
    with pytest.raises(MissingMandatoryValue, match="model.pretrained"):
        _ = cfg.model.pretrained  # and phf.run.execute says which key (tests/test_faults.py)


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "phf.run", *args], capture_output=True, text=True, timeout=120
    )


def test_cli_help_lists_the_groups() -> None:
    result = run_cli("--help")
    assert result.returncode == 0, result.stderr
    for group in GROUPS:
        assert f"{group}: " in result.stdout
    assert "tiny" in result.stdout and "toxicity" in result.stdout


def test_cli_prints_the_composed_config() -> None:
    result = run_cli("--cfg", "job", "train.lr=0.002", "model=gpt2")
    assert result.returncode == 0, result.stderr
    assert "lr: 0.002" in result.stdout
    assert "pretrained: gpt2" in result.stdout


def test_cli_unknown_key_exits_with_hydras_error() -> None:
    result = run_cli("--cfg", "job", "train.lrr=0.1")
    assert result.returncode != 0
    assert "lrr" in result.stderr


@pytest.mark.parametrize(
    "task,scorer", [("toxicity", "profanity"), ("pii", "pii"), ("pep8", "pep8")]
)
def test_each_task_picks_its_scorer_and_the_command_line_wins(compose_cfg, task, scorer) -> None:
    assert compose_cfg([f"task={task}"]).scorer.name == scorer
    assert compose_cfg([f"task={task}", "scorer=profanity"]).scorer.name == "profanity"
    assert compose_cfg(["scorer=profanity", f"task={task}"]).scorer.name == "profanity"


def test_pep8_evaluates_function_signatures(compose_cfg) -> None:
    scenarios = compose_cfg(["task=pep8"]).task.scenarios
    assert set(scenarios) == {"unconditional", "functions"}
    assert scenarios.functions.prompts == "function_signatures" and scenarios.functions.score_prompt


OBJECTIVES = ["mle", "filtering", "conditional", "unlikelihood", "awr", "rwr"]


@pytest.mark.parametrize("task", ["toxicity", "pii", "pep8"])
@pytest.mark.parametrize("objective", OBJECTIVES)
def test_every_task_objective_pair_has_its_numbers(compose_cfg, task: str, objective: str) -> None:
    cfg = compose_cfg([f"task={task}", f"objective={objective}"])
    assert cfg.objective.name == objective and cfg.task.name == task
    if objective in ("filtering", "conditional", "unlikelihood"):
        assert cfg.objective.threshold is not None  # from conf/task_objective/
    if objective in ("awr", "rwr"):
        assert cfg.objective.beta != 1.0  # the schema default is replaced per task
    assert cfg.objective.alpha == {"awr": 0.5}.get(objective, 1.0)


def test_every_task_objective_file_names_a_real_pair() -> None:
    tasks, objectives = set(options("task")), set(options("objective"))
    for name in options("task_objective"):
        task, objective = name.split("_", 1)
        assert task in tasks and objective in objectives, name


def test_the_objective_comparison_experiment(compose_cfg) -> None:
    cfg = compose_cfg(["experiment=objective_comparison"])
    assert cfg.task.name == "toxicity"
    # The command line still wins: the same comparison on another task.
    assert compose_cfg(["experiment=objective_comparison", "task=pii"]).task.name == "pii"
    assert cfg.eval.kl_reference == "sweep:mle"
    assert cfg.tracking.experiment == "objective_comparison"
    text = (CONF_DIR / "experiment" / "objective_comparison.yaml").read_text()
    assert "objective: mle,filtering,conditional,unlikelihood,awr,rwr" in text
    assert "phf -m experiment=objective_comparison" in text  # opens with its command


def test_signature_ignores_seed_hardware_and_tracking() -> None:
    from phf.sweep import signature

    base = signature(["objective=awr", "train.lr=0.001", "seed=1", "hardware=cpu"])
    assert base == signature(["train.lr=0.001", "seed=2", "objective=awr", "tracking.uri=x"])
    assert base != signature(["objective=awr", "train.lr=0.002", "seed=1"])


METHODS = [
    "mle",
    "conditional",
    "awr",
    "unlikelihood",
    "conditional_ft",
    "ppo",
    "grpo",
    "rloo",
    "dpo",
]


@pytest.mark.parametrize("method", METHODS)
def test_every_arm_of_the_method_comparison_composes(compose_cfg, method: str) -> None:
    from phf.config import validate_config

    cfg = compose_cfg(["experiment=method_comparison", f"method={method}"])
    validate_config(cfg)
    assert cfg.method.name == method
    assert cfg.objective.name == method.removesuffix("_ft")
    starts_from_mle = method in ("conditional_ft", "ppo", "grpo", "rloo", "dpo")
    assert (cfg.model.pretrained == "sweep:mle") == starts_from_mle
    # Every arm is evaluated the same way.
    assert cfg.eval.kl_reference == "sweep:mle"
    assert (cfg.eval.generation.num_samples, cfg.eval.generation.min_new_tokens) == (200, 32)
    text = (CONF_DIR / "experiment" / "method_comparison.yaml").read_text()
    assert f"{method}" in text.split("method:")[1].splitlines()[0]


def test_the_method_comparison_at_scale_composes(compose_cfg) -> None:
    cfg = compose_cfg(["experiment=method_comparison_gpu", "method=conditional"])
    assert cfg.model.name == "gpt2_small" and cfg.model.architecture.n_layer == 12
    assert cfg.scorer.name == "detoxify" and cfg.task.dataset == "tomekkorbak/pile-detoxify"
    assert cfg.train.block_size == 1024 and cfg.eval.kl_reference == "sweep:mle"


def test_a_sweep_configuration_label_is_a_valid_mlflow_metric_prefix() -> None:
    from mlflow.utils.validation import _validate_metric_name

    from phf.tracking.sweeps import configuration_label

    assert configuration_label("objective=awr seed=2") == "objective:awr"
    assert configuration_label("seed=1") == "all"
    label = configuration_label("reward.dropout=0.1 tracking.uri=sqlite:////tmp/mlflow.db")
    _validate_metric_name(f"{label}/eval/accuracy")  # raises on an invalid name


def test_resume_compares_resolved_references_as_they_are(compose_cfg) -> None:
    """phf.run resolves sweep:<objective> before it compares a checkpoint's config with the
    run's (and before the run opens): a reference resolved to the same run matches, another
    run or null does not, and nothing excuses an unresolved one."""
    from omegaconf import OmegaConf

    from phf.config import resume_differences

    now = compose_cfg(["objective=unlikelihood", "eval.kl_reference=runs:/abc/model"])
    assert resume_differences(now, now) == []
    other = OmegaConf.merge(now, {"eval": {"kl_reference": "runs:/xyz/model"}})
    assert resume_differences(other, now) == [
        "eval.kl_reference: 'runs:/xyz/model' in the checkpoint, 'runs:/abc/model' now"
    ]
    unresolved = OmegaConf.merge(now, {"eval": {"kl_reference": "sweep:mle"}})
    assert resume_differences(now, unresolved) == [
        "eval.kl_reference: 'runs:/abc/model' in the checkpoint, 'sweep:mle' now"
    ]


def test_every_stage_describes_itself_and_each_stage_value_has_one() -> None:
    """run.STAGES is the one table of stages: each class names its stage, title, config
    section and model references, and every value of objective.stage reaches one."""
    from phf.config import PhfConfig
    from phf.config import Stage as StageName
    from phf.run import STAGE_SECTIONS, STAGES

    assert set(STAGES) == {s.value for s in StageName}
    for name, stage in STAGES.items():
        assert stage.name == name and stage.title and stage.data_parallel
        assert "model.pretrained" in stage.model_references
        assert stage.section is None or stage.section in PhfConfig.__dataclass_fields__
    assert set(STAGE_SECTIONS) == {"reward", "ppo", "sft", "dpo", "grpo", "rloo"}
