"""Scorers: hand-picked clean texts score below dirty ones, edge cases, fallbacks, and building
each option of the scorer group from the composed config.

detoxify is exercised through its real loading code on a tiny random BERT written to tmp_path in
detoxify's checkpoint format, since its real weights cannot be downloaded here.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import pycodestyle
import pytest
from omegaconf import OmegaConf

from phf.data.segment import split_lines
from phf.scorers import (
    PEP8_PAPER_IGNORE,
    DetoxifyScorer,
    PEP8Scorer,
    PIIScorer,
    ProfanityScorer,
    ScorerUnavailable,
    build_scorer,
)

CLEAN_PROSE = "Have a nice day."
PII_PROSE = "Mail me at jane.doe@example.com or call (415) 555-0132."


def fail_on(marker: str, call):
    """``call`` that raises when any of its texts (its first argument, or ``lines=``) contains
    ``marker``: a text that crashes the library underneath a scorer."""

    def wrapped(*args, **kwargs):
        texts = args[0] if args else kwargs["lines"]
        if any(marker in text for text in texts):
            raise ValueError(f"cannot score {marker}")
        return call(*args, **kwargs)

    return wrapped


# --- pep8 -----------------------------------------------------------------------------------


def test_pep8_clean_line_scores_below_a_bad_one() -> None:
    clean, dirty = "x = 1\n", "x=1;y =2  \n"
    scores = PEP8Scorer().score_texts([clean, dirty])
    # E225 x2, E231, E702, W291 on an 11-character line.
    assert scores == [0.0, 5 / len(dirty)]


def test_pep8_syntax_error_is_one_e901_not_a_crash() -> None:
    text = "def f(:\n"
    assert PEP8Scorer().score_texts([text]) == [1 / len(text)]
    # ...and that one violation is E901: ignoring it leaves nothing.
    assert PEP8Scorer(ignore=["E901"]).score_texts([text]) == [0.0]


def test_pep8_empty_text_scores_zero() -> None:
    assert PEP8Scorer().score_texts(["", "x = 1\n", ""]) == [0.0, 0.0, 0.0]


def test_pep8_long_lines_are_cut_and_still_count_as_too_long() -> None:
    # E702 and E225 sit beyond the cut: only the cut line's E501 is seen.
    text = "x = '" + "a" * 20_000 + "';y=1\n"
    start = time.perf_counter()
    capped = PEP8Scorer(max_line_chars=1000).score_texts([text])
    assert time.perf_counter() - start < 1.0
    assert capped == [1 / len(text)]
    assert PEP8Scorer(max_line_chars=50_000).score_texts([text]) == [4 / len(text)]
    with pytest.raises(ValueError, match="max_line_chars"):
        PEP8Scorer(max_line_length=79, max_line_chars=79)


def test_pep8_a_single_line_is_judged_as_a_line_inside_a_file() -> None:
    scorer = PEP8Scorer(ignore=[])
    # Indented lines, blank lines and a missing newline are not violations of a lone line...
    assert scorer.score_texts(["    return x\n", "        y = 2", "\n"]) == [0.0, 0.0, 0.0]
    # ...but tabs, 3-space indentation and trailing whitespace still are.
    assert all(s > 0 for s in scorer.score_texts(["\tx = 1\n", "   x = 1\n", "   \n"]))
    # A text of several lines is a whole file: its missing final newline is W292.
    assert scorer.score_texts(["x = 1\ny = 2"]) == [1 / 11]


def test_pep8_score_documents_checks_each_line_in_its_document() -> None:
    document = "def f(a,\n      b):\n    return a+b  \n"
    lines = split_lines(document)
    # W291 on the third line only; E226 (a+b) is in the paper's ignore list.
    in_context = [0.0, 0.0, 1 / len(lines[2])]
    # A segment with no text, and a document with none, score 0.0.
    assert PEP8Scorer().score_documents([lines, ["", "x = 1\n"], [], [""]]) == [
        in_context,
        [0.0, 0.0],
        [],
        [0.0],
    ]
    # Out of its statement the continuation line is an unclosed bracket (E901).
    assert PEP8Scorer().score_texts(lines)[1] > 0
    # Violations land on the segment holding the end of their line (a line cut into pieces).
    # E225 twice, E231, E702: 4 on the line "x=1;y =2", all given to its second piece.
    assert PEP8Scorer().score_documents([["x=1", ";y =2\n", "z = 3\n"]]) == [[0.0, 4 / 6, 0.0]]


def test_other_scorers_score_documents_segment_by_segment() -> None:
    documents = [["Have a nice day. ", "You are a stupid idiot."], [], ["Hello."]]
    scorer = ProfanityScorer()
    scores = scorer.score_documents(documents)
    assert [len(s) for s in scores] == [2, 0, 1]
    assert scores[0] == scorer.score_texts(documents[0]) and scores[0][0] < scores[0][1]


def test_pep8_prints_nothing(capsys: pytest.CaptureFixture[str]) -> None:
    texts = ["import os, sys\n", "def f(:\n", "x=1;y =2  \n\n\n", "\tif x :\n  pass", "'''"]
    scores = PEP8Scorer().score_texts(texts)
    assert all(s > 0 for s in scores)
    assert capsys.readouterr() == ("", "")


def test_pep8_one_crashing_text_does_not_lose_the_batch(monkeypatch, caplog) -> None:
    texts = ["x = 1\n", "x=1\n", "boom = 1\n", "y=2\n"]
    expected = PEP8Scorer().score_texts(texts)
    monkeypatch.setattr(pycodestyle, "Checker", fail_on("boom", pycodestyle.Checker), raising=True)
    with caplog.at_level(logging.WARNING, logger="phf.scorers"):
        scores = PEP8Scorer().score_texts(texts)
    assert math.isnan(scores[2])
    assert scores[:2] + scores[3:] == expected[:2] + expected[3:]
    assert "1 of 4 texts could not be scored" in caplog.text


# --- pii ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pii() -> PIIScorer:
    return PIIScorer()  # imports scrubadub (~2.5 s), once for the module


def test_pii_clean_sentence_scores_below_one_with_an_email_and_a_phone(pii: PIIScorer) -> None:
    assert pii.score_texts([CLEAN_PROSE, PII_PROSE, ""]) == [0.0, 2 / len(PII_PROSE), 0.0]


def test_pii_uk_numbers_need_en_gb_and_count_once(pii: PIIScorer) -> None:
    uk = "Call 020 7946 0958 today."
    international = "Call +44 20 7946 0958 today."  # found by both the US and the UK detector
    assert PIIScorer(locales=["en_US"]).score_texts([uk]) == [0.0]
    assert pii.score_texts([uk, international]) == [1 / len(uk), 1 / len(international)]
    assert {"phone", "phone_en_GB"} <= set(pii.detectors)
    assert "text_blob_name" not in pii.detectors


def test_pii_documented_misdetections_still_happen(pii: PIIScorer) -> None:
    """If scrubadub stops doing these, PIIScorer's docstring must be updated."""
    noon, decorator = "We meet at noon.", "@property"
    assert pii.score_texts([noon, decorator]) == [1 / len(noon), 1 / len(decorator)]
    assert pii.score_texts(["card 4111 1111 1111 1111"]) == [0.0]


def test_pii_one_crashing_text_does_not_lose_the_batch(pii: PIIScorer, monkeypatch) -> None:
    texts = [CLEAN_PROSE, PII_PROSE, "boom", "SSN 123-45-6789"]
    expected = pii.score_texts(texts)
    scorer = PIIScorer(batch_size=3)
    scrubber = scorer._scrubber
    monkeypatch.setattr(
        scrubber, "iter_filth_documents", fail_on("boom", scrubber.iter_filth_documents)
    )
    scores = scorer.score_texts(texts)
    assert math.isnan(scores[2])
    assert scores[:2] + scores[3:] == expected[:2] + expected[3:]
    assert expected[3] > 0


# --- detoxify -------------------------------------------------------------------------------

TOXICITY_CLASSES = ["toxic", "severe_toxic", "obscene", "threat", "insult", "identity_hate"]
SENTENCES = ["You are a wonderful person.", "I hate you, you idiot.", "", "The sky is blue."]


def write_tiny_detoxify(directory: Path, model_type: str | None = None) -> Path:
    """A random 2-layer BERT (hidden 32) and its tokenizer saved in ``directory``, and a .ckpt in
    detoxify's format whose config points ``model_type`` at ``directory`` unless given."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizer

    words = ["you", "are", "a", "wonderful", "person", "i", "hate", "idiot", "the", "sky", "."]
    vocab = directory / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    tokenizer = BertTokenizer(vocab=str(vocab), model_max_length=64)
    config = BertConfig(
        vocab_size=len(words) + 5,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        num_labels=len(TOXICITY_CLASSES),
    )
    torch.manual_seed(0)
    model = BertForSequenceClassification(config)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    checkpoint = directory / f"tiny-{'local' if model_type is None else 'hub'}.ckpt"
    arch_args = {
        "model_type": model_type or str(directory),
        "model_name": "BertForSequenceClassification",
        "tokenizer_name": "BertTokenizer",
        "num_classes": len(TOXICITY_CLASSES),
    }
    torch.save(
        {
            "config": {
                "arch": {"args": arch_args},
                "dataset": {"args": {"classes": TOXICITY_CLASSES}},
            },
            "state_dict": model.state_dict(),
        },
        checkpoint,
    )
    return checkpoint


@pytest.fixture(scope="module")
def tiny_detoxify(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # This module fixture is set up before conftest's per-test offline_env; huggingface_hub reads
    # HF_HUB_OFFLINE once, when transformers first imports it, possibly here.
    with pytest.MonkeyPatch.context() as env:
        env.setenv("HF_HUB_OFFLINE", "1")
        return write_tiny_detoxify(tmp_path_factory.mktemp("tiny_detoxify"))


@pytest.fixture
def no_torch_hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))


def test_detoxify_scores_through_detoxifys_own_loader(tiny_detoxify: Path) -> None:
    scorer = DetoxifyScorer(checkpoint=str(tiny_detoxify), device="cpu", batch_size=2)
    scores = scorer.score_texts(SENTENCES)
    assert len(scores) == len(SENTENCES)
    assert scores[2] == 0.0  # the empty text
    assert all(math.isfinite(s) and 0.0 <= s <= 1.0 for s in scores)
    assert len(set(scores)) > 2  # random weights, but not a constant
    assert scorer.score_texts(SENTENCES) == scores
    assert scorer.score_texts(SENTENCES[::-1]) == pytest.approx(scores[::-1], abs=1e-6)


def test_detoxify_huggingface_config_path_loads_offline(tiny_detoxify: Path) -> None:
    """A checkpoint naming a hub model (as the real ones do: 'bert-base-uncased') loads offline
    from huggingface_config_path, with the same weights, hence the same scores."""
    hub_named = write_tiny_detoxify(tiny_detoxify.parent, model_type="bert-base-uncased")
    local = DetoxifyScorer(checkpoint=str(tiny_detoxify), device="cpu")
    offline = DetoxifyScorer(
        checkpoint=str(hub_named),
        huggingface_config_path=str(tiny_detoxify.parent),
        device="cpu",
    )
    assert offline.score_texts(SENTENCES) == pytest.approx(local.score_texts(SENTENCES), abs=1e-6)


def test_detoxify_without_weights_fails_at_once_saying_what_to_do(
    tmp_path: Path, no_torch_hub_cache: None
) -> None:
    start = time.perf_counter()
    with pytest.raises(
        ScorerUnavailable, match=r"(?s)not cached.*scorer\.checkpoint=.*scorer=profanity"
    ):
        DetoxifyScorer(model_type="original", device="cpu")
    assert time.perf_counter() - start < 3.0  # no network retries
    with pytest.raises(ScorerUnavailable, match=r"(?s)does not exist.*scorer=profanity"):
        DetoxifyScorer(checkpoint=str(tmp_path / "missing.ckpt"), device="cpu")
    with pytest.raises(ScorerUnavailable, match="is not a directory"):
        DetoxifyScorer(
            checkpoint=None, huggingface_config_path=str(tmp_path / "nope"), device="cpu"
        )
    assert issubclass(ScorerUnavailable, RuntimeError)


def test_detoxify_one_crashing_text_does_not_lose_the_batch(
    tiny_detoxify: Path, monkeypatch, caplog
) -> None:
    scorer = DetoxifyScorer(checkpoint=str(tiny_detoxify), device="cpu", batch_size=8)
    texts = [*SENTENCES, "boom"]
    expected = scorer.score_texts(texts)
    monkeypatch.setattr(scorer, "_tokenizer", fail_on("boom", scorer._tokenizer))
    with caplog.at_level(logging.WARNING, logger="phf.scorers"):
        scores = scorer.score_texts(texts)
    assert math.isnan(scores[-1])
    assert scores[:-1] == pytest.approx(expected[:-1], abs=1e-6)
    assert "1 of 5 texts could not be scored" in caplog.text


# --- build_scorer from the composed config --------------------------------------------------


def test_build_profanity(compose_cfg) -> None:
    scorer = build_scorer(compose_cfg(["scorer=profanity"]).scorer)
    assert isinstance(scorer, ProfanityScorer)
    clean, toxic = scorer.score_texts(["Have a wonderful day", "You are a stupid idiot."])
    assert clean < toxic


def test_build_pii(compose_cfg) -> None:
    scorer = build_scorer(compose_cfg(["scorer=pii"]).scorer)
    assert isinstance(scorer, PIIScorer)
    clean, dirty = scorer.score_texts([CLEAN_PROSE, PII_PROSE])
    assert clean < dirty
    only_us = build_scorer(compose_cfg(["scorer=pii", "scorer.locales=[en_US]"]).scorer)
    assert "phone_en_GB" not in only_us.detectors


def test_build_pep8_uses_the_papers_ignore_list(compose_cfg) -> None:
    cfg = compose_cfg(["scorer=pep8"]).scorer
    assert tuple(cfg.ignore) == PEP8_PAPER_IGNORE
    scorer = build_scorer(cfg)
    assert isinstance(scorer, PEP8Scorer)
    clean, dirty, e226 = scorer.score_texts(["x = 1\n", "x=1;y =2  \n", "x = a*b+1\n"])
    assert clean < dirty and e226 == 0.0
    everything = build_scorer(compose_cfg(["scorer=pep8", "scorer.ignore=[]"]).scorer)
    assert everything.score_texts(["x = a*b+1\n"])[0] > 0


def test_build_detoxify(compose_cfg, tiny_detoxify: Path, no_torch_hub_cache: None) -> None:
    cfg = compose_cfg(["scorer=detoxify", f"scorer.checkpoint={tiny_detoxify}"]).scorer
    scorer = build_scorer(cfg)
    assert isinstance(scorer, DetoxifyScorer)
    assert scorer.batch_size == 64
    assert all(0.0 <= s <= 1.0 for s in scorer.score_texts(SENTENCES))
    # The default detoxify option, offline and with nothing cached: the clear error.
    with pytest.raises(ScorerUnavailable, match="scorer=profanity"):
        build_scorer(compose_cfg(["scorer=detoxify"]).scorer)


def test_build_unknown_scorer_lists_the_valid_ones() -> None:
    with pytest.raises(
        ValueError, match=r"choose one of \['detoxify', 'pep8', 'pii', 'profanity'\]"
    ):
        build_scorer(OmegaConf.create({"name": "nope", "batch_size": 1}))
