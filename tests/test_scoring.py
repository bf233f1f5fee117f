"""The scoring pipeline: sources, segmenting, sharding, resuming, and bad input."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

import phf.data.scoring as scoring
from phf.config import compose_config
from phf.data.corpus import DatasetError, iter_documents
from phf.data.scoring import score_corpus, segment
from phf.scorers import ProfanityScorer

PROSE = [
    "The weather was lovely today. We walked to the park and fed the ducks.",
    "What a stupid idiot you are. Get lost, you moron!",
    "Tea is best served hot. Add milk if you like.",
]


def read_rows(path: Path) -> list[dict]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def all_rows(out: Path) -> list[dict]:
    return read_rows(out / "train.jsonl.gz") + read_rows(out / "test.jsonl.gz")


@pytest.fixture
def profanity_cfg():
    return compose_config(["scorer=profanity"]).scorer


def write_prose_files(folder: Path, n: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        (folder / f"doc_{i:03d}.txt").write_text(f"Document {i}. " + PROSE[i % len(PROSE)])


def test_segment_cuts_overlong_segments() -> None:
    segments, cut = segment("short. " + "x" * 25, "sentences", max_segment_chars=10)
    assert segments == ["short. ", "x" * 10, "x" * 10, "x" * 5] and cut == 1
    lines, cut = segment("a = 1\nb = 2\n", "lines", max_segment_chars=100)
    assert lines == ["a = 1\n", "b = 2\n"] and cut == 0


def test_folder_of_text_files_to_phf_format(tmp_path: Path, profanity_cfg) -> None:
    write_prose_files(tmp_path / "src", 9)
    report = score_corpus(
        str(tmp_path / "src"),
        tmp_path / "out",
        profanity_cfg,
        "sentences",
        shard_size=4,
        test_fraction=0.3,
        progress=False,
    )
    assert (report.documents, report.shards_written, report.shards_resumed) == (9, 3, 0)
    rows = all_rows(tmp_path / "out")
    assert len(rows) == 9 and read_rows(tmp_path / "out" / "test.jsonl.gz")
    by_source = {Path(r["source"]).name: r for r in rows}
    rude = by_source["doc_001.txt"]
    assert "".join(rude["texts"]) == "Document 1. " + PROSE[1]
    assert rude["texts"][1] == "What a stupid idiot you are. "
    assert rude["scores"][1] > 0.8 > max(by_source["doc_000.txt"]["scores"])
    assert rude["avg_score"] == pytest.approx(sum(rude["scores"]) / len(rude["scores"]), abs=1e-5)
    # The output is a dataset phf trains on directly.
    docs = list(iter_documents("toxicity", str(tmp_path / "out"), "train"))
    assert docs and all(len(d.texts) == len(d.scores) for d in docs)


def test_jsonl_rows_and_phf_rows_are_scored(tmp_path: Path, profanity_cfg) -> None:
    src = tmp_path / "data.jsonl"
    src.write_text(
        json.dumps({"body": PROSE[0]})
        + "\n"
        + json.dumps({"texts": ["Already ", "segmented."], "scores": [0, 0]})
        + "\n"
    )
    score_corpus(
        str(src),
        tmp_path / "out",
        profanity_cfg,
        "sentences",
        text_field="body",
        test_fraction=0.0,
        progress=False,
    )
    rows = read_rows(tmp_path / "out" / "train.jsonl.gz")
    assert [r["row"] for r in rows] == [1, 2]
    assert "".join(rows[1]["texts"]) == "Already segmented."


def test_local_dataset_in_the_papers_schema_loads_through_datasets(
    tmp_path: Path, profanity_cfg
) -> None:
    """The hub path (datasets.load_dataset) on a local folder with the schema of
    tomekkorbak/pile-detoxify: texts, scores, avg_score, plus metadata."""
    src = tmp_path / "pile-detoxify"
    src.mkdir()
    row = {
        "texts": ["You idiot. ", "Nice day."],
        "scores": [0.9, 0.01],
        "avg_score": 0.45,
        "num_sents": 2,
        "meta": {"pile_set_name": "Pile-CC"},
    }
    (src / "train.jsonl").write_text(json.dumps(row) + "\n")
    docs = list(scoring._hub_documents(str(src), "text", "train"))
    assert [d.text for d in docs] == ["You idiot. Nice day."]
    from phf.data.corpus import hub_rows, validate_row

    [(hub_row, where, _)] = list(hub_rows(str(src), "train"))
    assert validate_row(hub_row, where).scores == [0.9, 0.01]


def test_interrupted_job_resumes_shard_by_shard(tmp_path: Path, profanity_cfg, monkeypatch) -> None:
    write_prose_files(tmp_path / "src", 10)
    uninterrupted = tmp_path / "full"
    score_corpus(
        str(tmp_path / "src"),
        uninterrupted,
        profanity_cfg,
        "sentences",
        shard_size=2,
        progress=False,
    )

    calls = {"n": 0}

    class InterruptedScorer(ProfanityScorer):
        def score_texts(self, texts):
            calls["n"] += 1
            if calls["n"] == 3:
                raise KeyboardInterrupt  # Ctrl-C while the third shard is being scored
            return super().score_texts(texts)

    out = tmp_path / "resumed"
    monkeypatch.setattr(scoring, "build_scorer", lambda cfg: InterruptedScorer())
    with pytest.raises(KeyboardInterrupt):
        score_corpus(
            str(tmp_path / "src"), out, profanity_cfg, "sentences", shard_size=2, progress=False
        )
    assert sorted(p.name for p in (out / "shards").glob("*.gz")) == [
        "shard_00000.jsonl.gz",
        "shard_00001.jsonl.gz",
    ]
    (out / "shards" / "shard_00002.jsonl.gz.tmp").write_text("half-written")  # a killed write
    monkeypatch.setattr(scoring, "build_scorer", lambda cfg: ProfanityScorer())
    report = score_corpus(
        str(tmp_path / "src"), out, profanity_cfg, "sentences", shard_size=2, progress=False
    )
    assert (report.shards_resumed, report.shards_written, report.documents) == (2, 3, 6)
    for split in ("train.jsonl.gz", "test.jsonl.gz"):
        assert read_rows(out / split) == read_rows(uninterrupted / split)


def test_resume_with_other_settings_is_refused(tmp_path: Path, profanity_cfg) -> None:
    write_prose_files(tmp_path / "src", 2)
    score_corpus(
        str(tmp_path / "src"), tmp_path / "out", profanity_cfg, "sentences", progress=False
    )
    with pytest.raises(ValueError, match="other settings"):
        score_corpus(
            str(tmp_path / "src"), tmp_path / "out", profanity_cfg, "lines", progress=False
        )


def test_bad_files_are_counted_and_skipped(tmp_path: Path, profanity_cfg) -> None:
    src = tmp_path / "src"
    write_prose_files(src, 2)
    (src / "empty.txt").write_text("   \n")
    (src / "latin1.txt").write_bytes("Caf\xe9 au lait. Tr\xe8s bien.".encode("latin-1"))
    (src / "dangling.txt").symlink_to(tmp_path / "missing.txt")
    (src / "long.txt").write_text("word " * 3000)  # one 15,000-character "sentence"
    report = score_corpus(
        str(src),
        tmp_path / "out",
        profanity_cfg,
        "sentences",
        max_segment_chars=1000,
        test_fraction=0.0,
        progress=False,
    )
    counts = report.stats.counts
    assert counts["empty documents"] == 1
    assert counts["unreadable files"] == 1
    assert counts["files with undecodable bytes (replaced with U+FFFD)"] == 1
    assert counts["segments longer than 1000 characters (cut into pieces)"] == 1
    rows = read_rows(tmp_path / "out" / "train.jsonl.gz")
    assert len(rows) == 4  # 2 prose + latin1 + long
    latin = next(r for r in rows if r["source"].endswith("latin1.txt"))
    assert "\ufffd" in "".join(latin["texts"])
    long_row = next(r for r in rows if r["source"].endswith("long.txt"))
    assert max(len(t) for t in long_row["texts"]) == 1000


def test_a_scorer_failure_drops_only_that_document(
    tmp_path: Path, profanity_cfg, monkeypatch
) -> None:
    write_prose_files(tmp_path / "src", 3)

    class FlakyScorer(ProfanityScorer):
        def score_texts(self, texts):
            return [
                float("nan") if "Tea" in t else s
                for t, s in zip(texts, super().score_texts(texts), strict=True)
            ]

    monkeypatch.setattr(scoring, "build_scorer", lambda cfg: FlakyScorer())
    report = score_corpus(
        str(tmp_path / "src"),
        tmp_path / "out",
        profanity_cfg,
        "sentences",
        test_fraction=0.0,
        progress=False,
    )
    assert report.stats.counts["documents dropped: the scorer failed on a segment"] == 1
    assert len(read_rows(tmp_path / "out" / "train.jsonl.gz")) == 2


@pytest.mark.parametrize(
    "content,message",
    [
        ('{"body": "x"}\n', r"row 1: no text field 'text'"),
        ('{"text": "ok"}\n{"text": \n', r"row 2: not valid JSON"),
    ],
)
def test_wrong_schema_names_file_and_row(
    tmp_path: Path, profanity_cfg, content: str, message: str
) -> None:
    src = tmp_path / "rows.jsonl"
    src.write_text(content)
    with pytest.raises(DatasetError, match=message):
        score_corpus(str(src), tmp_path / "out", profanity_cfg, "sentences", progress=False)


def test_missing_source_and_unreachable_hub_id(tmp_path: Path, profanity_cfg) -> None:
    with pytest.raises(DatasetError, match="does not exist"):
        score_corpus(
            str(tmp_path / "nope"), tmp_path / "out", profanity_cfg, "sentences", progress=False
        )
    with pytest.raises(DatasetError, match="could not be loaded from the Hugging Face hub"):
        score_corpus(
            "no-such-org/no-such-data",
            tmp_path / "out2",
            profanity_cfg,
            "sentences",
            progress=False,
        )


def test_cli_parallel_matches_single_process(tmp_path: Path, capsys) -> None:
    write_prose_files(tmp_path / "src", 12)
    for workers in (1, 2):
        code = scoring.main(
            [
                str(tmp_path / "src"),
                "--out",
                str(tmp_path / f"w{workers}"),
                "--scorer",
                "profanity",
                "--workers",
                str(workers),
                "--shard-size",
                "3",
            ]
        )
        assert code == 0
        assert "scored 12 documents" in capsys.readouterr().out
    assert all_rows(tmp_path / "w1") == all_rows(tmp_path / "w2")
