"""Preference data (phf/data/preferences.py): the three row schemas, errors that name the row,
local files and directories, and the builtin pairs derived from a scored corpus."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from phf.data.corpus import DatasetError, Document
from phf.data.preferences import (
    BUILTIN_PROMPT_CHARS,
    Comparison,
    builtin_comparisons,
    detect_format,
    load_comparisons,
    parse_row,
    split_hh,
)

WHERE = "prefs.jsonl, row 7"


# --- schemas ---------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["pairwise", "auto"])
def test_pairwise_row(fmt: str) -> None:
    row = {"prompt": "Q: sky?", "chosen": " Blue.", "rejected": " Green."}
    assert parse_row(row, WHERE, fmt) == Comparison("Q: sky?", (" Blue.", " Green."), 0, 0.0, WHERE)


def test_pairwise_row_margin() -> None:
    row = {"prompt": "Q", "chosen": "a", "rejected": "b", "margin": 2}
    comparison = parse_row(row, WHERE, "auto")
    assert comparison.margin == 2.0 and isinstance(comparison.margin, float)
    assert parse_row({**row, "margin": 0.25}, WHERE, "pairwise").margin == 0.25


@pytest.mark.parametrize("margin", ["1.0", True, None])
def test_pairwise_row_non_numeric_margin_names_the_row(margin) -> None:
    row = {"prompt": "Q", "chosen": "a", "rejected": "b", "margin": margin}
    with pytest.raises(DatasetError, match="margin") as error:
        parse_row(row, WHERE, "pairwise")
    assert WHERE in str(error.value)


HH_CHOSEN = (
    "\n\nHuman: What is 2+2?\n\nAssistant: 4.\n\nHuman: And 3+3?\n\nAssistant: It is 6, of course."
)
HH_REJECTED = "\n\nHuman: What is 2+2?\n\nAssistant: 4.\n\nHuman: And 3+3?\n\nAssistant: It is 7."
HH_PROMPT = "\n\nHuman: What is 2+2?\n\nAssistant: 4.\n\nHuman: And 3+3?\n\nAssistant:"


@pytest.mark.parametrize("fmt", ["hh", "auto"])
def test_hh_row_splits_shared_prompt_and_final_turns(fmt: str) -> None:
    comparison = parse_row({"chosen": HH_CHOSEN, "rejected": HH_REJECTED}, WHERE, fmt)
    assert comparison.prompt == HH_PROMPT
    assert comparison.prompt.endswith("\n\nAssistant:")
    # The responses share " It is " with each other, but the prompt stops at the turn marker.
    assert comparison.responses == (" It is 6, of course.", " It is 7.")
    assert comparison.best == 0 and comparison.margin == 0.0
    assert comparison.prompt + comparison.responses[0] == HH_CHOSEN
    assert comparison.prompt + comparison.responses[1] == HH_REJECTED


def test_split_hh_single_turn() -> None:
    assert split_hh("\n\nHuman: hi\n\nAssistant: yes", "\n\nHuman: hi\n\nAssistant: no", WHERE) == (
        "\n\nHuman: hi\n\nAssistant:",
        " yes",
        " no",
    )


def test_split_hh_when_responses_differ_right_after_the_marker() -> None:
    prompt, chosen, rejected = split_hh(
        "\n\nHuman: hi\n\nAssistant:Yes", "\n\nHuman: hi\n\nAssistant:No", WHERE
    )
    assert (prompt, chosen, rejected) == ("\n\nHuman: hi\n\nAssistant:", "Yes", "No")


def test_split_hh_takes_the_last_shared_assistant_turn_when_earlier_turns_differ() -> None:
    chosen = "\n\nHuman: a\n\nAssistant: x\n\nHuman: b\n\nAssistant: good"
    rejected = "\n\nHuman: a\n\nAssistant: y"
    prompt, c, r = split_hh(chosen, rejected, WHERE)
    assert prompt == "\n\nHuman: a\n\nAssistant:"
    assert (c, r) == (" x\n\nHuman: b\n\nAssistant: good", " y")


def test_hh_pair_without_a_shared_assistant_turn_names_the_row() -> None:
    row = {
        "chosen": "\n\nHuman: Hi there\n\nAssistant: Hello!",
        "rejected": "\n\nHuman: Go away\n\nAssistant: No.",
    }
    with pytest.raises(DatasetError, match="Assistant") as error:
        parse_row(row, WHERE, "hh")
    assert WHERE in str(error.value)


@pytest.mark.parametrize("fmt", ["best_of_n", "auto"])
def test_best_of_n_row(fmt: str) -> None:
    row = {"query": "Once", "sample0": " a", "sample1": " b", "sample2": " c", "best": 2}
    comparison = parse_row(row, WHERE, fmt)
    assert comparison == Comparison("Once", (" a", " b", " c"), 2, 0.0, WHERE)


def test_best_of_n_ignores_margin_and_counts_samples_up_to_the_first_gap() -> None:
    row = {"query": "Q", "sample0": "a", "sample1": "b", "sample3": "d", "best": 1, "margin": 5}
    comparison = parse_row(row, WHERE, "best_of_n")
    assert comparison.responses == ("a", "b") and comparison.margin == 0.0


# --- errors that name the row ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("row", "fmt", "fragment"),
    [
        ({"text": "hello", "label": 1}, "auto", "unknown preference schema"),
        ({"prompt": "Q", "chosen": "a"}, "pairwise", "'rejected'"),
        ({"chosen": "a"}, "hh", "'rejected'"),
        ({"query": "Q", "sample0": "a", "best": 0}, "best_of_n", "'sample1'"),
        ({"query": "Q", "sample0": "a", "sample1": "b"}, "best_of_n", "'best'"),
        ({"query": "Q", "sample0": "a", "sample1": "b", "best": 2}, "best_of_n", "best"),
        ({"query": "Q", "sample0": "a", "sample1": "b", "best": -1}, "best_of_n", "best"),
        ({"query": "Q", "sample0": "a", "sample1": "b", "best": "1"}, "best_of_n", "integer"),
        ({"query": "Q", "sample0": "a", "sample1": "b", "best": 1.0}, "best_of_n", "integer"),
        ({"query": "Q", "sample0": "a", "sample1": "b", "best": True}, "best_of_n", "integer"),
        ({"prompt": "Q", "chosen": "  \n", "rejected": "b"}, "pairwise", "empty"),
        ({"query": "Q", "sample0": "a", "sample1": "", "best": 0}, "best_of_n", "response 1"),
        ({"prompt": 5, "chosen": "a", "rejected": "b"}, "pairwise", "'prompt' must be a string"),
        ({"prompt": "Q", "chosen": ["a"], "rejected": "b"}, "auto", "'chosen' must be a string"),
        ({"chosen": None, "rejected": "b"}, "hh", "'chosen' must be a string"),
        ({"query": "Q", "sample0": "a", "sample1": 3, "best": 0}, "auto", "'sample1' must be"),
        (["prompt", "chosen", "rejected"], "auto", "JSON object"),
    ],
)
def test_malformed_rows_raise_naming_the_row(row, fmt: str, fragment: str) -> None:
    with pytest.raises(DatasetError) as error:
        parse_row(row, WHERE, fmt)
    assert WHERE in str(error.value)
    assert fragment in str(error.value)


def test_missing_columns_message_lists_the_columns_found() -> None:
    with pytest.raises(DatasetError, match=r"found columns \['chosen', 'prompt'\]"):
        parse_row({"prompt": "Q", "chosen": "a"}, WHERE, "pairwise")


def test_unknown_format_value_is_a_config_error() -> None:
    with pytest.raises(DatasetError, match="reward.format='xml'"):
        parse_row({"prompt": "Q", "chosen": "a", "rejected": "b"}, WHERE, "xml")


def test_detect_format() -> None:
    assert detect_format({"prompt": "", "chosen": "", "rejected": ""}, WHERE) == "pairwise"
    assert detect_format({"chosen": "", "rejected": ""}, WHERE) == "hh"
    assert detect_format({"query": "", "sample0": ""}, WHERE) == "best_of_n"
    assert detect_format({"best": 0}, WHERE) == "best_of_n"
    with pytest.raises(DatasetError, match="unknown preference schema") as error:
        detect_format({"chosen": ""}, WHERE)
    assert WHERE in str(error.value)


# --- local files ---------------------------------------------------------------------------


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def reward_cfg(dataset: str, fmt: str = "auto"):
    return OmegaConf.create(
        {"dataset": dataset, "format": fmt, "train_split": "train", "test_split": "test"}
    )


def pairwise_rows(n: int) -> list[dict]:
    return [{"prompt": f"p{i}", "chosen": f"c{i}", "rejected": f"r{i}"} for i in range(1, n + 1)]


def test_single_file_holds_out_every_tenth_row(tmp_path: Path) -> None:
    path = tmp_path / "prefs.jsonl"
    write_jsonl(path, pairwise_rows(25))
    cfg = reward_cfg(str(path))
    train = load_comparisons(cfg, None, "train", seed=0)
    test = load_comparisons(cfg, None, "test", seed=0)
    assert [c.prompt for c in test] == ["p10", "p20"]
    assert [c.prompt for c in train] == [f"p{i}" for i in range(1, 26) if i % 10 != 0]
    assert not {c.prompt for c in train} & {c.prompt for c in test}
    assert test[0].where == f"{path}, row 10"
    assert test[0].responses == ("c10", "r10")


def test_single_file_bad_row_names_file_and_row(tmp_path: Path) -> None:
    path = tmp_path / "prefs.jsonl"
    rows = pairwise_rows(5)
    rows[2] = {"prompt": "p3", "chosen": "c3"}
    write_jsonl(path, rows)
    with pytest.raises(DatasetError, match="missing 'rejected'") as error:
        load_comparisons(reward_cfg(str(path)), None, "train", seed=0)
    assert f"{path}, row 3" in str(error.value)


def test_directory_of_splits(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "train.jsonl", pairwise_rows(12))
    test_rows = [
        {"query": f"q{i}", "sample0": "a", "sample1": "b", "sample2": "c", "best": i % 3}
        for i in range(4)
    ]
    write_jsonl(tmp_path / "test.jsonl", test_rows)
    cfg = reward_cfg(str(tmp_path))
    train = load_comparisons(cfg, None, "train", seed=0)
    test = load_comparisons(cfg, None, "test", seed=0)
    # A directory's splits are its files, whole: no row is held out of train.
    assert [c.prompt for c in train] == [f"p{i}" for i in range(1, 13)]
    assert [(c.prompt, c.best, len(c.responses)) for c in test] == [
        (f"q{i}", i % 3, 3) for i in range(4)
    ]


def test_directory_without_the_split_and_missing_paths(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "train.jsonl", pairwise_rows(3))
    with pytest.raises(DatasetError, match="no 'test' split"):
        load_comparisons(reward_cfg(str(tmp_path)), None, "test", seed=0)
    with pytest.raises(DatasetError, match="does not exist"):
        load_comparisons(reward_cfg(str(tmp_path / "nope.jsonl")), None, "train", seed=0)


def test_empty_split_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "prefs.jsonl"
    write_jsonl(path, pairwise_rows(5))  # no 10th row: the test split is empty
    with pytest.raises(DatasetError, match="'test' split .* has no rows"):
        load_comparisons(reward_cfg(str(path)), None, "test", seed=0)


def test_forced_format_applies_to_every_row(tmp_path: Path) -> None:
    path = tmp_path / "hh.jsonl"
    write_jsonl(path, [{"chosen": HH_CHOSEN, "rejected": HH_REJECTED}] * 3)
    (comparison, *_) = load_comparisons(reward_cfg(str(path), "hh"), None, "train", seed=0)
    assert comparison.prompt == HH_PROMPT
    with pytest.raises(DatasetError, match="missing 'prompt'"):
        load_comparisons(reward_cfg(str(path), "pairwise"), None, "train", seed=0)


# --- builtin pairs ---------------------------------------------------------------------------


def test_builtin_pairs_by_hand() -> None:
    documents = [
        Document(
            texts=["Hello there. ", "You idiot. ", "Nice day. ", "A much longer calm sentence. "],
            scores=[0.0, 0.9, 0.1, 0.0],
        ),
        Document(texts=["Calm. ", "Jerk! "], scores=[0.2, 0.8]),
        Document(texts=["Bad bad. "], scores=[0.95]),
    ]
    # Scores 0, 0, 0.1, 0.2, 0.8, 0.9, 0.95: median 0.2, so aligned means <= 0.2; rejected
    # means above the threshold 0.5.
    comparisons = builtin_comparisons(documents, hit_threshold=0.5, seed=0)
    assert len(comparisons) == 3
    first, second, third = comparisons
    # "You idiot. " (11 chars): of the document's aligned segments (13, 10, 29 chars) the
    # closest in length is "Nice day. "; the prompt is the text before it.
    assert first == Comparison(
        "Hello there. ",
        ("Nice day. ", "You idiot. "),
        0,
        0.0,
        "builtin pair from document 0, segment 1",
    )
    # Document 1's only aligned segment stands in the prompt ("Calm. "): a chosen response from
    # there would teach "repeat the context", so a random aligned segment of the split that
    # is not in the prompt is chosen (seeded), as for document 2, which has none.
    aligned = ["Hello there. ", "Nice day. ", "A much longer calm sentence. ", "Calm. "]
    rng = random.Random(0)
    assert second.prompt == "Calm. " and second.responses[1] == "Jerk! "
    assert second.responses[0] == rng.choice(aligned[:3])
    assert third.prompt == "" and third.responses[1] == "Bad bad. "
    assert third.responses[0] == rng.choice(aligned)
    assert third.where == "builtin pair from document 2, segment 0"
    assert builtin_comparisons(documents, 0.5, seed=0) == comparisons


def test_builtin_pairs_random_fallback_depends_on_the_seed() -> None:
    aligned = [f"calm sentence {i}. " for i in range(20)]
    documents = [Document(texts=aligned, scores=[0.0] * 20), Document(["Awful! "], [1.0])]
    chosen = {builtin_comparisons(documents, 0.5, seed)[0].responses[0] for seed in range(10)}
    assert chosen <= set(aligned)
    assert len(chosen) > 1


def test_builtin_pairs_skip_blank_segments_and_keep_whitespace() -> None:
    documents = [
        Document(
            texts=["  ", "    bad line\n", "\tcalm line\n", "\n"], scores=[0.0, 0.9, 0.0, 0.99]
        ),
    ]
    # Median 0.45 <= threshold 0.5. "\n" scores high but is blank: no pair. The blank "  " is
    # aligned but never chosen.
    (comparison,) = builtin_comparisons(documents, 0.5, seed=0)
    assert comparison.responses == ("\tcalm line\n", "    bad line\n")
    assert comparison.prompt == "  "


def test_builtin_prompt_is_the_last_chars_before_the_rejected_segment() -> None:
    before = [f"Sentence number {i} is calm. " for i in range(20)]
    documents = [Document(texts=[*before, "Awful words. "], scores=[0.0] * 20 + [1.0])]
    (comparison,) = builtin_comparisons(documents, 0.5, seed=0)
    assert len("".join(before)) > BUILTIN_PROMPT_CHARS
    assert comparison.prompt == "".join(before)[-BUILTIN_PROMPT_CHARS:]


def test_builtin_pairs_of_nothing() -> None:
    assert builtin_comparisons([], 0.5, seed=0) == []
    assert builtin_comparisons([Document(["calm. "], [0.0])], 0.5, seed=0) == []


def test_builtin_toxicity_pairs(compose_cfg) -> None:
    cfg = compose_cfg(["task=toxicity"])
    assert cfg.reward.dataset == "builtin"
    train = load_comparisons(cfg.reward, cfg.task, cfg.reward.train_split, seed=0)
    test = load_comparisons(cfg.reward, cfg.task, cfg.reward.test_split, seed=0)
    assert len(train) > 500 and len(test) > 50
    for comparison in train + test:
        assert len(comparison.responses) == 2 and comparison.best == 0
        assert all(r.strip() for r in comparison.responses)
        assert len(comparison.prompt) <= BUILTIN_PROMPT_CHARS
