"""Word search over text read from images (mm_retrieval.ocr): normalising, scoring, the boxes
the page highlights, and the pipeline file's [index] ocr key. No OCR runs here (see
tests/integration/indexing/test_ocr.py for the real reader)."""

import pytest

from mm_retrieval.config import ConfigError, IndexConfig, PipelineConfig
from mm_retrieval.errors import InputError
from mm_retrieval.ocr import _words, match_boxes, normalize, query_words, score_text


def test_normalize_keeps_letters_and_digits_of_any_script():
    assert normalize("  Open DAILY: 7am—10pm!  Café_Noir ") == "open daily 7am 10pm café noir"


def test_query_without_words_is_refused():
    assert query_words("Harbour-Bakery") == ["harbour", "bakery"]
    with pytest.raises(InputError, match="has none"):
        query_words("?!")


def test_phrase_outranks_the_same_words_apart_and_a_whole_word_a_part_of_one():
    phrase, _ = score_text(["harbour", "bakery"], "harbour bakery open")
    apart, _ = score_text(["harbour", "bakery"], "bakery by the harbour")
    one, matched = score_text(["harbour", "bakery"], "harbour view")
    assert phrase == 1.0 > apart > one > 0 and matched == ["harbour"]
    assert score_text(["zeppelin"], "harbour bakery") == (0.0, [])
    # the reader often drops the space between a sign's words: found, below a whole word
    joined, matched = score_text(["sunday"], "peppersunday")
    assert matched == ["sunday"] and 0 < joined < score_text(["sunday"], "pepper sunday")[0]
    assert score_text(["pepper", "sunday"], "peppersunday")[0] > score_text(["sunday", "pepper"], "peppersunday")[0]


def test_match_boxes_cut_a_joined_run_by_its_letters():
    read = [["PepperSunday", 100, 10, 220, 30], ["Open", 0, 50, 40, 70]]
    assert match_boxes(["sunday"], read) == [["sunday", 160, 10, 220, 30]]
    assert match_boxes(["open", "zeppelin"], read) == [["open", 0, 50, 40, 70]]


def test_words_from_character_boxes_split_at_spaces():
    chars = list("ab cd")
    boxes = [[[x, 0], [x + 8, 0], [x + 8, 10], [x, 10]] for x in (0, 10, 20, 30, 40)]
    assert _words("ab cd", boxes[0], boxes, chars) == [["ab", 0, 0, 18, 10], ["cd", 30, 0, 48, 10]]
    line = [[0, 0], [50, 0], [50, 10], [0, 10]]
    assert _words("ab cd", line, None, None) == [["ab", 0, 0, 50, 10], ["cd", 0, 0, 50, 10]]  # no character boxes: the line's


def test_index_ocr_config_key_round_trips_and_is_checked():
    cfg = PipelineConfig.from_dict({"index": {"ocr": True}})
    assert cfg.index == IndexConfig(ocr=True) and PipelineConfig.from_dict(cfg.to_dict()) == cfg
    assert "index" not in PipelineConfig().to_dict()  # the default writes nothing
    with pytest.raises(ConfigError, match="valid keys: ocr"):
        PipelineConfig.from_dict({"index": {"orc": True}})
    with pytest.raises(ConfigError):
        PipelineConfig.from_dict({"index": {"ocr": "yes"}})


def test_pipeline_takes_ocr_from_the_config_unless_told(tmp_path):
    from mm_retrieval import Pipeline

    on = PipelineConfig.from_dict({"index": {"ocr": True}})
    assert Pipeline(on, db=str(tmp_path / "a.db")).ocr is True
    assert Pipeline(on, db=str(tmp_path / "a.db"), ocr=False).ocr is False
    assert Pipeline(db=str(tmp_path / "a.db")).ocr is False
