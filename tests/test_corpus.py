"""Loading datasets: the built-in corpus, local directories, and clear errors for bad input."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from phf.data.corpus import DatasetError, iter_documents


def write_jsonl(path: Path, rows: list) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def test_builtin_toxicity_corpus_is_in_phf_format() -> None:
    train = list(iter_documents("toxicity", "builtin", "train"))
    test = list(iter_documents("toxicity", "builtin", "test"))
    assert len(train) > 1000 and len(test) > 100
    scores = [s for doc in train for s in doc.scores]
    assert all(0.0 <= s <= 1.0 for s in scores)
    assert 0.005 < sum(s > 0.5 for s in scores) / len(scores) < 0.5
    assert not {d.text for d in train} & {d.text for d in test}


def test_local_directory_jsonl_and_gzip(tmp_path: Path) -> None:
    write_jsonl(
        tmp_path / "train.jsonl", [{"texts": ["a. ", "b."], "scores": [0.1, 0.9], "avg_score": 0.5}]
    )
    with gzip.open(tmp_path / "test.jsonl.gz", "wt") as f:
        f.write(json.dumps({"texts": ["c."], "scores": [0]}) + "\n")
    [train] = iter_documents("toxicity", str(tmp_path), "train")
    [test] = iter_documents("toxicity", str(tmp_path), "test")
    assert train.texts == ["a. ", "b."] and train.scores == [0.1, 0.9]
    assert test.text == "c." and test.scores == [0.0]


def test_missing_path_is_named(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(DatasetError, match=f"{missing} does not exist"):
        list(iter_documents("toxicity", str(missing), "train"))


def test_missing_split_lists_what_is_there(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "train.jsonl", [])
    with pytest.raises(DatasetError, match=r"no 'test' split .*train\.jsonl"):
        list(iter_documents("toxicity", str(tmp_path), "test"))


def test_unknown_builtin_task() -> None:
    with pytest.raises(DatasetError, match="no built-in dataset for task 'nope'"):
        list(iter_documents("nope", "builtin", "train"))


@pytest.mark.parametrize(
    "bad_row,message",
    [
        ({"texts": ["x"]}, "missing 'scores'"),
        ({"scores": [0.1]}, "missing 'texts'"),
        ({"texts": ["x", "y"], "scores": [0.1]}, "2 texts but 1 scores"),
        ({"texts": "x", "scores": [0.1]}, "'texts' must be a list of strings"),
        ({"texts": ["x"], "scores": ["high"]}, "'scores' must be a list of numbers"),
        ({"texts": ["x"], "scores": [float("nan")]}, "NaN"),
        (["x"], "expected a JSON object"),
    ],
)
def test_malformed_row_names_file_and_row(tmp_path: Path, bad_row, message: str) -> None:
    good = {"texts": ["fine."], "scores": [0.0]}
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps(good) + "\n" + json.dumps(bad_row) + "\n")
    with pytest.raises(DatasetError, match=f"{path}, row 2: .*{message}"):
        list(iter_documents("toxicity", str(tmp_path), "train"))


def test_invalid_json_names_file_and_row(tmp_path: Path) -> None:
    path = tmp_path / "train.jsonl"
    path.write_text('{"texts": ["a"], "scores": [0]}\n{"texts": [\n')
    with pytest.raises(DatasetError, match=f"{path}, row 2: not valid JSON"):
        list(iter_documents("toxicity", str(tmp_path), "train"))


def test_unreachable_hub_dataset_gives_a_clear_error() -> None:
    with pytest.raises(DatasetError, match="could not be loaded from the Hugging Face hub"):
        list(iter_documents("toxicity", "no-such-org/no-such-dataset", "train"))
