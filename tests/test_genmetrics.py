"""Generation metrics: hand-computed cases for BLEU-3, ROUGE-L and token F1, BERTScore with the offline models."""

from __future__ import annotations

import pytest
from bsharedrag.genmetrics import (
    GENERATION_METRICS,
    BertScorer,
    bleu3,
    default_bertscorer,
    f1_tokens,
    generation_metrics,
    rouge_l,
    token_f1,
)
from rouge_score.rouge_scorer import RougeScorer
from sacrebleu.metrics import BLEU

EN_REFS = [["The drawer will fit if your fridge calls for the 240337103 crisper drawer."],
           ["No. A customer says that the item does not make any ice.", "No, the machine would not make ice at all."]]
ZH_REFS = [["佳能EOS 4000D适合初学者或入门级别的摄影师使用，支持Wi-Fi和NFC连接。"],
           ["挑选遮阳伞，第一步看看紫外线防护系数（UPF）的数值。", "选遮阳伞要看UPF值、涂层和面料。"]]


@pytest.mark.parametrize("lang, refs", [("en", EN_REFS), pytest.param("zh", ZH_REFS, marks=pytest.mark.slow)])
def test_exact_answers_score_one_on_every_metric(lang, refs):
    out = generation_metrics([r[-1] for r in refs], refs, lang)
    assert set(GENERATION_METRICS) <= set(out) and out["n"] == 2
    for metric in GENERATION_METRICS:
        assert out[metric] == pytest.approx(1.0, abs=1e-5), metric
    assert out["bertscore_model"] == default_bertscorer(lang).name


def test_disjoint_english_answers_score_about_zero():
    out = generation_metrics(["banana split recipe with chocolate sauce", "Paris is in France"], EN_REFS, "en")
    assert out["bleu3"] == out["rougeL"] == out["token_f1"] == 0.0
    assert out["bertscore_f1"] < 0.3  # raw cosine scale, no baseline rescaling: unrelated text is low, not 0


@pytest.mark.slow
def test_chinese_scores_order_exact_over_paraphrase_over_unrelated():
    ref = "这个手机我很喜欢，拍照效果好。"
    cands = [ref, "我喜欢这个手机，拍照很好。", "今天下午去公园散步。"]
    scores = {"bertscore_f1": default_bertscorer("zh").score(cands, [[ref]] * 3),
              "rougeL": [rouge_l(c, [ref], "zh") for c in cands], "token_f1": [token_f1(c, [ref], "zh") for c in cands]}
    for metric, (exact, close, unrelated) in scores.items():
        assert exact == pytest.approx(1.0, abs=1e-5) and exact > close > unrelated, metric
    assert scores["token_f1"][2] == 0.0
    assert scores["rougeL"][2] == pytest.approx(2 * 1 / 10 * 1 / 15 / (1 / 10 + 1 / 15))  # ROUGE counts the shared 。


def test_empty_prediction_is_allowed_and_scores_zero():
    out = generation_metrics(["", "No, the machine would not make ice at all."], EN_REFS, "en")
    assert out["n"] == 2
    assert out["rougeL"] == out["token_f1"] == pytest.approx(0.5)
    assert out["bertscore_f1"] == pytest.approx(0.5, abs=1e-5)
    assert generation_metrics(["  "], [["a reference"]], "en")["bertscore_f1"] == 0.0


def test_chinese_rouge_l_is_character_level():
    # LCS 这个手机 (4 characters) of 7 and 8: P = 4/7, R = 4/8.
    assert rouge_l("我喜欢这个手机", ["这个手机我很喜欢"], "zh") == pytest.approx(2 * (4 / 7) * (4 / 8) / (4 / 7 + 4 / 8))
    # The case this guards: rouge_score's default tokenizer keeps only [a-z0-9] and sees no Chinese at all.
    assert RougeScorer(["rougeL"]).score("这个手机我很喜欢", "我喜欢这个手机")["rougeL"].fmeasure == 0.0


def test_english_rouge_l_uses_the_default_tokenizer():
    # Lower-cased, punctuation dropped, no stemming: LCS "cat sat on mat" (4) of 6 and 5 tokens.
    assert rouge_l("The cat sat on the mat.", ["a CAT sat on mat"], "en") == pytest.approx(2 * 4 / 6 * 4 / 5 / (4 / 6 + 4 / 5))
    assert rouge_l("cats", ["cat"], "en") == 0.0


def test_bleu3_by_hand_and_against_sacrebleu():
    # 6 tokens each, so no brevity penalty; clipped precisions 5/6 (one "the"), 3/5, 2/4.
    assert bleu3(["the cat sat on the mat"], [["the cat sat on a mat"]], "en") == pytest.approx((5 / 6 * 3 / 5 * 2 / 4) ** (1 / 3))
    hyps = ["No, it does not make any ice at all.", "The drawer fits crisper drawer 240337103.", ""]
    refs = [EN_REFS[1], EN_REFS[0], ["Yes, it does."]]
    streams = [[r[0] for r in refs], [r[1] if len(r) > 1 else None for r in refs]]
    direct = BLEU(max_ngram_order=3, tokenize="13a").corpus_score(hyps, streams).score / 100
    assert 0 < direct < 1 and bleu3(hyps, refs, "en") == pytest.approx(direct)
    zh_hyps = ["这款相机适合初学者使用，支持Wi-Fi。", "遮阳伞要看UPF数值。"]
    zh_direct = BLEU(max_ngram_order=3, tokenize="zh").corpus_score(
        zh_hyps, [[r[0] for r in ZH_REFS], [None, ZH_REFS[1][1]]]).score / 100
    assert 0 < zh_direct < 1 and bleu3(zh_hyps, ZH_REFS, "zh") == pytest.approx(zh_direct)


def test_token_f1_by_hand():
    # English: articles and punctuation go, "cat sat on mat" shared; P = 4/4, R = 4/5.
    assert f1_tokens("The cat sat on the mat.", "en") == ["cat", "sat", "on", "mat"]
    assert token_f1("The cat sat on the mat.", ["A cat sat on a red mat!"], "en") == pytest.approx(2 * 0.8 / 1.8)
    assert token_f1("Yes, it isn't.", ["yes it isnt"], "en") == 1.0
    # Chinese: characters, CJK and ASCII punctuation ignored; 7 shared of 7 and 8: P = 1, R = 7/8.
    assert token_f1("我喜欢这个手机。", ["这个手机，我很喜欢！"], "zh") == pytest.approx(14 / 15)
    # A Latin run is one word, full-width letters fold to ASCII: 支 持 nfc of 支 持 nfc 功 能.
    assert f1_tokens("支持ＮＦＣ功能。", "zh") == ["支", "持", "nfc", "功", "能"]
    assert token_f1("支持NFC", ["支持ＮＦＣ功能。"], "zh") == pytest.approx(0.75)
    assert token_f1("", ["a cat"], "en") == token_f1("我", ["你"], "zh") == 0.0


def test_every_metric_uses_the_best_reference():
    refs = [["Something unrelated about a warranty card.", "The latch only comes in black."]]
    assert token_f1("The latch only comes in black.", refs[0], "en") == 1.0
    assert rouge_l("The latch only comes in black.", refs[0], "en") == 1.0
    out = generation_metrics(["The latch only comes in black."], refs, "en")
    for metric in GENERATION_METRICS:
        assert out[metric] == pytest.approx(1.0, abs=1e-5), metric
    alone = generation_metrics(["The latch only comes in black."], [refs[0][:1]], "en")
    assert all(alone[metric] < 0.5 for metric in GENERATION_METRICS)


@pytest.mark.parametrize("call, named", [
    (lambda: generation_metrics(["a"], [["a"]], "fr"), "'fr'"),
    (lambda: generation_metrics(["a"], [["a"]], "EN"), "'EN'"),
    (lambda: bleu3(["a"], [["a"]], "de"), "'de'"),
    (lambda: default_bertscorer("ja"), "'ja'"),
    (lambda: generation_metrics(["a", "b"], [["a"]], "en"), "2 predictions but 1 reference"),
    (lambda: generation_metrics([], [], "en"), "empty"),
    (lambda: generation_metrics(["a", "b"], [["a"], []], "en"), "question 1 has no reference"),
    (lambda: generation_metrics(["a"], [["  "]], "en"), "question 0 has no reference"),
])
def test_bad_input_raises_value_error_naming_it(call, named, tally):
    with pytest.raises(ValueError, match=named) as info:
        call()
    if "'" in named:
        assert "en, zh" in str(info.value)
    tally("bad inputs tried")


def test_references_must_be_lists_per_question(tally):
    with pytest.raises(TypeError, match="references\\[0\\] is str"):
        generation_metrics(["a"], ["a"], "en")
    with pytest.raises(TypeError, match="prediction 0 is NoneType"):
        generation_metrics([None], [["a"]], "en")
    tally("bad inputs tried", 2)


def test_bertscorer_is_lazy_and_scores_blank_candidates_zero():
    scorer = BertScorer("/nonexistent/model", 3, "nothing")
    assert scorer.score(["", " \n"], [["a"], ["b"]]) == [0.0, 0.0]
    assert scorer._scorer is None
    with pytest.raises(ValueError, match="2 candidates but 1"):
        scorer.score(["a", "b"], [["a"]])


def test_default_bertscorer_is_cached_per_language():
    assert default_bertscorer("en") is default_bertscorer("en")
    assert default_bertscorer("en").name == "all-MiniLM-L6-v2 (layer 6)"
    assert default_bertscorer("zh").name == "Gemma 3 270M backbone (layer 18)"
    assert default_bertscorer("en") is not default_bertscorer("zh")
