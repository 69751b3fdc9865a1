"""Grounded decoding answers with a passage span or the no-answer reply, scored by the model's own likelihood."""

import json
import math
from dataclasses import replace

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st
from transformers import GPT2Config, GPT2LMHeadModel

from conftest import TINY_CONFIG
from data.files import DataError
from data.passages import question_terms
from data.prompt_format import NO_ANSWER_REPLY, generation_prompt, reading_comprehension_message, squad_layout_of
from trm.reading.grounded import (
    GroundedSettings, _word_boundaries, answer_from_passage, answer_from_passages, calibrate_no_answer_threshold,
    holds_an_answer_word, score_replies,
)

WORDS = ["the", "river", "Rhine", "flows", "1,233", "km", "north", "(Lake", "Constance)", "through", "Basel,", "über",
         "Köln.", "It", "ends", "in", "Hoek", "van", "Holland.", "—", "x", "Oxygen's", "O2", "\"quoted\"", "e.g."]


def _random_model(seed: int, positions: int = 128) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(**{**TINY_CONFIG, "n_positions": positions})).eval()


def _answer_like(span: str, question: str) -> bool:
    return holds_an_answer_word(span, set(question_terms(question)))


def _reply_logprob(model, tokenizer, passage: str, question: str, reply: str) -> float:
    """log P(" reply<|endoftext|>" | prompt) by one plain forward pass, without any cache."""
    layout = squad_layout_of(model)
    prompt = generation_prompt([{"role": "user", "content": reading_comprehension_message(passage, question, layout)}])
    prompt_ids = tokenizer(prompt)["input_ids"]
    reply_ids = tokenizer(" " + reply)["input_ids"] + [tokenizer.eos_token_id]
    ids = torch.tensor([prompt_ids + reply_ids])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(ids).logits[0].float(), dim=-1)
    positions = torch.arange(len(prompt_ids) - 1, len(prompt_ids) + len(reply_ids) - 1)
    return float(logprobs[positions, torch.tensor(reply_ids)].sum())


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(words=st.lists(st.sampled_from(WORDS), min_size=1, max_size=25), seed=st.integers(0, 3),
       threshold=st.floats(-5, 5), candidates=st.integers(1, 12))
def test_the_reply_is_always_a_passage_span_or_the_no_answer_reply(tokenizer, words, seed, threshold, candidates):
    passage = " ".join(words)
    model = _random_model(seed)
    config = GroundedSettings(max_answer_tokens=6, start_candidates=candidates, no_answer_threshold=threshold)
    answer = answer_from_passage(model, tokenizer, passage, "Where does the river end?", config)
    if answer.answered:
        assert answer.answer == answer.span and answer.span in passage
        assert passage[answer.char_start:answer.char_start + len(answer.span)] == answer.span
        before = passage[answer.char_start - 1] if answer.char_start > 0 else " "
        assert before == " "  # spans start at a word
    else:
        assert answer.answer == NO_ANSWER_REPLY


def test_scores_are_the_model_likelihood_and_the_best_span_wins(tokenizer):
    passage = "The Rhine ends in Hoek van Holland, near Rotterdam."
    question = "Where does the Rhine end?"
    model = _random_model(seed=1)
    config = GroundedSettings(max_answer_tokens=8, start_candidates=100, prior_weight=0.0, proximity_weight=0.0, length_bonus=0.0)
    answer = answer_from_passage(model, tokenizer, passage, question, config)
    assert answer.span_score == pytest.approx(_reply_logprob(model, tokenizer, passage, question, answer.span), abs=1e-3)
    assert answer.no_answer_score == pytest.approx(_reply_logprob(model, tokenizer, passage, question, NO_ANSWER_REPLY), abs=1e-3)
    # Brute force over every whole-word span: none is likelier than the one chosen.
    words = passage.split()
    spans = {" ".join(words[i:j]).rstrip(",.") for i in range(len(words)) for j in range(i + 1, len(words) + 1)}
    spans |= {" ".join(words[i:j]) for i in range(len(words)) for j in range(i + 1, len(words) + 1)}
    best = max(_reply_logprob(model, tokenizer, passage, question, span) for span in spans
               if len(tokenizer(" " + span)["input_ids"]) <= config.max_answer_tokens and _answer_like(span, question))
    assert answer.span_score == pytest.approx(best, abs=1e-3)


def test_the_prior_subtracts_each_replys_likelihood_without_the_question(tokenizer, monkeypatch):
    import trm.reading.grounded

    passage = "The Rhine ends in Hoek van Holland, near Rotterdam."
    question = "Where does the Rhine end?"
    model = _random_model(seed=4)

    def combined(reply: str, weight: float) -> float:
        return (_reply_logprob(model, tokenizer, passage, question, reply)
                - weight * _reply_logprob(model, tokenizer, passage, "", reply))

    monkeypatch.setattr(trm.reading.grounded, "PRIOR_RESCORED_SPANS", 1000)  # every span rescored: brute force can check the choice
    words = passage.split()
    spans = {" ".join(words[i:j]).rstrip(",.") for i in range(len(words)) for j in range(i + 1, len(words) + 1)}
    spans |= {" ".join(words[i:j]) for i in range(len(words)) for j in range(i + 1, len(words) + 1)}
    chosen = {}
    for weight in (0.5, 1.0):
        config = GroundedSettings(max_answer_tokens=8, start_candidates=100, prior_weight=weight, proximity_weight=0.0,
                                  length_bonus=0.0)
        answer = answer_from_passage(model, tokenizer, passage, question, config)
        assert answer.span_score == pytest.approx(combined(answer.span, weight), abs=1e-3)
        assert answer.no_answer_score == pytest.approx(combined(NO_ANSWER_REPLY, weight), abs=1e-3)
        best = max(combined(span, weight) for span in spans
                   if len(tokenizer(" " + span)["input_ids"]) <= 8 and _answer_like(span, question))
        assert answer.span_score == pytest.approx(best, abs=1e-3)
        chosen[weight] = answer.span
    # Rescoring only the best few spans by the question's score, their length and proximity keeps the best of those.
    monkeypatch.setattr(trm.reading.grounded, "PRIOR_RESCORED_SPANS", 2)
    wide = GroundedSettings(max_answer_tokens=8, start_candidates=100, proximity_weight=trm.reading.grounded.RESCORED_PROXIMITY_WEIGHT,
                            length_bonus=trm.reading.grounded.RESCORED_LENGTH_BONUS)
    scored = trm.reading.grounded.score_replies(model, tokenizer, passage, question, wide)
    assert len(scored.spans) == 2
    plain = answer_from_passage(model, tokenizer, passage, question, replace(wide, prior_weight=0.0))
    assert scored.answer(replace(wide, prior_weight=0.0)).span == plain.span


def test_the_spans_rescored_are_the_best_by_score_length_and_proximity(tokenizer, monkeypatch):
    import trm.reading.grounded

    passage = ("Cats sleep all day long in warm houses with soft beds and quiet rooms for many hours. "
               "The Rhine river will end at the sea near Rotterdam.")
    question = "Where does the Rhine river end?"
    every_start = GroundedSettings(max_answer_tokens=8, start_candidates=100, prior_weight=0.0)
    monkeypatch.setattr(trm.reading.grounded, "PRIOR_RESCORED_SPANS", 1)
    proximity_decided = 0
    for seed in range(8):
        model = _random_model(seed)
        every_span = score_replies(model, tokenizer, passage, question, every_start).spans  # no prior: none left out
        with_proximity = max(every_span, key=lambda s: s[2] + trm.reading.grounded.RESCORED_LENGTH_BONUS * s[4]
                             + trm.reading.grounded.RESCORED_PROXIMITY_WEIGHT * s[5])
        without = max(every_span, key=lambda s: s[2] + trm.reading.grounded.RESCORED_LENGTH_BONUS * s[4])
        rescored = score_replies(model, tokenizer, passage, question, replace(every_start, prior_weight=0.5)).spans
        assert [s[0] for s in rescored] == [with_proximity[0]]
        proximity_decided += with_proximity[0] != without[0]
    assert proximity_decided  # some model's pick depends on the question's words nearby


def test_the_words_nearest_the_questions_start_candidates_beside_the_models_likeliest(tokenizer, monkeypatch):
    import trm.reading.grounded
    from trm.reading.grounded import proximity_to_question

    words = ("cats sleep all day long in warm houses with soft beds and quiet rooms for many hours while dogs run "
             "outside near old boats where fishermen wait until the Rhine river reaches Rotterdam by its mouth on this sea").split()
    passage, question = " ".join(words), "Where is the Rhine river mouth?"
    first_token = [tokenizer(" " + word)["input_ids"][0] for word in words]
    assert len(set(first_token)) == len(words)  # each candidate row names its word by its first token
    positions = [passage.index(f" {word} ") + 1 if 0 < n < len(words) - 1 else passage.index(word) for n, word in enumerate(words)]
    nearness = proximity_to_question(passage, question, [(p, p + len(w)) for p, w in zip(positions, words)])
    started = []
    original = trm.reading.grounded._ended_reply_scores

    def recording(model, first, cache, prompt_length, rows, eos):
        started.append([first_token.index(row[0]) for row in rows[:-1]])  # the last row is the no-answer reply
        return original(model, first, cache, prompt_length, rows, eos)

    monkeypatch.setattr(trm.reading.grounded, "_ended_reply_scores", recording)
    model = _random_model(seed=3)
    for near in (0, 5, 12):
        started.clear()
        score_replies(model, tokenizer, passage, question, GroundedSettings(start_candidates=1, starts_near_question=near,
                                                                             prior_weight=0.0))
        likeliest, *others = started[0]
        assert len(started[0]) == len(set(started[0])) and near <= len(others) + 1 and len(others) <= near
        left_out = [nearness[n] for n in range(len(words)) if n not in started[0]]
        assert all(nearness[n] >= max(left_out) for n in others)
    nearest = max(range(len(words)), key=nearness.__getitem__)  # "reaches", between the question's words
    assert nearest != likeliest and nearest in started[0]


def test_candidates_are_distinct_replies_with_a_word_the_question_lacks(tokenizer):
    passage = "Paris is a city with many old streets and parks of its own. The Rhine ends in the sea near Paris, and the Rhine is long."
    question = "Where does the Rhine end?"
    every_start = GroundedSettings(max_answer_tokens=6, start_candidates=100, prior_weight=0.0)
    scored = score_replies(_random_model(seed=5), tokenizer, passage, question, every_start)
    texts = [text for text, *_ in scored.spans]
    assert len(texts) == len(set(texts)) and "Paris" in texts
    assert not {"the", "The", "is", "in the", "Rhine", "the Rhine", "Rhine is"} & set(texts)
    assert all(holds_an_answer_word(text, {"rhine", "end"}) for text in texts)
    paris = next(start for text, start, *_ in scored.spans if text == "Paris")
    assert paris == passage.rindex("Paris")  # the occurrence beside the question's words
    # With no other word to offer, the passage's spans are still the candidates, each once.
    only_question_words = score_replies(_random_model(seed=5), tokenizer, "The Rhine is the Rhine.", question, every_start)
    assert only_question_words.spans and len({t for t, *_ in only_question_words.spans}) == len(only_question_words.spans)


def test_the_threshold_decides_between_span_and_abstention(tokenizer):
    model = _random_model(seed=2)
    passage, question = "Paris is the capital of France.", "What is the capital of France?"
    margin = answer_from_passage(model, tokenizer, passage, question, GroundedSettings()).margin
    above = answer_from_passage(model, tokenizer, passage, question, GroundedSettings(no_answer_threshold=margin - 0.01))
    below = answer_from_passage(model, tokenizer, passage, question, GroundedSettings(no_answer_threshold=margin + 0.01))
    forced = answer_from_passage(model, tokenizer, passage, question,
                                 GroundedSettings(no_answer_threshold=margin + 0.01, allow_no_answer=False))
    assert above.answered and above.answer in passage
    assert not below.answered and below.answer == NO_ANSWER_REPLY and below.span == above.span
    assert forced.answered and forced.answer == above.answer


def test_several_passages_keep_the_most_confident_answer_and_long_questions_are_refused(tokenizer):
    model = _random_model(seed=3)
    passages = ["Paris is the capital of France.", "The Rhine flows north.", "Oxygen is a gas."]
    question = "What is the capital?"
    position, chosen = answer_from_passages(model, tokenizer, passages, question, GroundedSettings())
    margins = [answer_from_passage(model, tokenizer, p, question, GroundedSettings()).margin for p in passages]
    assert position == max(range(3), key=margins.__getitem__) and chosen.margin == pytest.approx(max(margins))
    assert answer_from_passages(model, tokenizer, passages, "why " * 200, GroundedSettings()) is None
    with pytest.raises(ValueError, match="no room"):
        answer_from_passage(model, tokenizer, "word " * 150, question, GroundedSettings())


def test_calibration_picks_the_threshold_that_maximises_f1():
    # margins, best-span F1, has an answer: answering questions 2 and 3 only is best (F1 = (1 + 1 + 1 + 0.5) / 4).
    margins = [-2.0, -1.0, 1.0, 3.0]
    span_f1 = [0.0, 0.0, 1.0, 0.5]
    has_answer = [False, False, True, True]
    threshold, f1 = calibrate_no_answer_threshold(margins, span_f1, has_answer)
    assert -1.0 <= threshold < 1.0 and f1 == pytest.approx(100 * 3.5 / 4)
    # When every answer is wrong, the unanswerable questions must abstain; answering the others costs nothing.
    threshold, f1 = calibrate_no_answer_threshold(margins, [0.0] * 4, has_answer)
    assert threshold >= -1.0 and f1 == pytest.approx(50.0)
    # When the unanswerable questions have the largest margins, everything must abstain.
    threshold, f1 = calibrate_no_answer_threshold(margins, [0.0] * 4, [True, True, False, False])
    assert threshold == 3.0 and f1 == pytest.approx(50.0)
    # Equal margins are decided together: the threshold cannot split them.
    threshold, _ = calibrate_no_answer_threshold([0.0, 0.0], [0.0, 0.0], [False, True])
    assert threshold in (-1.0, 0.0)


def test_calibration_chooses_the_smallest_weights_with_the_best_spans_then_their_threshold(monkeypatch):
    import trm.evaluation
    from trm.evaluation import weight_choices
    from trm.reading.grounded import ScoredReplies

    # Question 1: "Basel" is likelier, but also likelier without the question; above a prior weight of 1/6 the answer
    # "Hoek van Holland" wins, and so it does at any prior weight once the proximity (0.5 against 0.1) counts 3 times
    # or more, or once each of its 4 tokens (against 1) earns more than 1/6. Question 2 has no answer.
    scored = [ScoredReplies([("Basel", 0, -1.0, -0.5, 1, 0.1), ("Hoek van Holland", 10, -1.5, -3.5, 4, 0.5)], (-2.0, -1.0)),
              ScoredReplies([("Oxygen", 0, -3.0, -1.0, 1, 0.0)], (-1.0, -2.0))]
    rows = [{"context": "", "question": "", "answers": ["Hoek van Holland"]}, {"context": "", "question": "", "answers": []}]
    monkeypatch.setattr(trm.evaluation, "grounded_squad_scores", lambda *args, **kwargs: scored)

    def calibrate(choices):
        return trm.evaluation.calibrate_grounding_on(None, None, rows, GroundedSettings(), "toy", choices=choices)

    result = calibrate({"prior_weight": (0.0, 0.25, 0.5), "proximity_weight": (0.0, 3.0), "length_bonus": (0.0,)})
    assert result["has_answer_span_f1_by_weights"] == {
        "prior 0, proximity 0, length bonus 0": 0.0, "prior 0, proximity 3, length bonus 0": 100.0,
        "prior 0.25, proximity 0, length bonus 0": 100.0, "prior 0.25, proximity 3, length bonus 0": 100.0,
        "prior 0.5, proximity 0, length bonus 0": 100.0, "prior 0.5, proximity 3, length bonus 0": 100.0}
    assert (result["prior_weight"], result["proximity_weight"], result["length_bonus"]) == (0.0, 3.0, 0.0)
    # The threshold is then calibrated on the margins at those weights: answer 1, abstain on 2 (F1 100).
    margins = [(-1.5 + 3.0 * 0.5) - (-2.0), -3.0 - (-1.0)]
    assert result["no_answer_threshold"] == calibrate_no_answer_threshold(margins, [1.0, 0.0], [True, False])[0]
    assert result["f1_at_threshold"] == 100.0 and result["answered_share"] == 50.0
    # With the proximity and the length bonus fixed at 0, the smallest prior weight that finds the answer.
    without = calibrate(weight_choices(proximity_weight=0.0, length_bonus=0.0))
    assert (without["prior_weight"], without["proximity_weight"], without["length_bonus"]) == (0.25, 0.0, 0.0)
    # With only the length bonus free, the smallest bonus that finds it.
    lengthwise = calibrate(weight_choices(prior_weight=0.0, proximity_weight=0.0))
    assert (lengthwise["prior_weight"], lengthwise["proximity_weight"], lengthwise["length_bonus"]) == (0.0, 0.0, 0.25)
    # Fixed weights (run_eval --prior_weight/--proximity_weight/--length_bonus) are not chosen: they are kept.
    fixed = calibrate(weight_choices(prior_weight=0.0, proximity_weight=0.0, length_bonus=0.0))
    assert (fixed["prior_weight"], fixed["proximity_weight"], fixed["length_bonus"]) == (0.0, 0.0, 0.0)


def test_proximity_is_the_weighted_share_of_the_question_terms_around_a_span():
    from trm.reading.grounded import proximity_to_question

    passage = "Basel lies on the Rhine. The Rhine ends in the North Sea at Hoek van Holland, far from Basel."
    question = "Where does the river Rhine end?"  # terms: river, rhine, end (river and end are not in the passage)
    hoek = passage.index("Hoek van Holland")
    first_basel = (0, len("Basel"))
    near, basel_first, whole = proximity_to_question(passage, question, [(hoek, hoek + len("Hoek van Holland")), first_basel, (0, len(passage))])
    # "Rhine" is 7 words before "Hoek" and 4 after the first "Basel", and counts 1 - d/16 at d words; "river" and
    # "end" are not in the passage, and weigh as a word seen once would.
    in_passage, absent = math.log1p(1 / 2), 2 * math.log(2)
    assert near == pytest.approx((1 - 7 / 16) * in_passage / (in_passage + absent))
    assert basel_first == pytest.approx((1 - 4 / 16) * in_passage / (in_passage + absent)) and basel_first > near
    for pads, expected in ((14, 1 / 16), (15, 0.0)):  # 15 words away: the window's edge; 16: out of it (each term seen once)
        spaced = "Rhine " + "word " * pads + "Basel and more words"
        basel = spaced.index("Basel")
        assert proximity_to_question(spaced, question, [(basel, basel + 5)]) == [pytest.approx(expected / 3)]
    assert whole == 0.0  # a span covering the passage has nothing around it
    # Terms weigh log(1 + 1/count): the rare one ("sea", once) counts more than the frequent one ("rhine", twice).
    sea_question = "Which sea is the Rhine in?"  # terms: sea, rhine
    apart = "Rhine X " + "pad " * 16 + "Rhine pad " + "pad " * 16 + "sea Z"
    x, z = apart.index("X"), apart.index("Z")
    near_rhine, near_sea = proximity_to_question(apart, sea_question, [(x, x + 1), (z, z + 1)])
    sea, rhine = math.log1p(1 / 1), math.log1p(1 / 2)
    assert near_rhine == pytest.approx(15 / 16 * rhine / (sea + rhine)) and near_sea == pytest.approx(15 / 16 * sea / (sea + rhine))
    # A term counts at its nearest occurrence, on either side.
    twice = "Rhine pad pad pad pad X pad Rhine"
    x = twice.index("X")
    assert proximity_to_question(twice, "Where is the Rhine?", [(x, x + 1)]) == [pytest.approx(1 - 2 / 16)]
    assert proximity_to_question("No shared words at all.", question, [(0, 2)]) == [0.0]


def test_each_scored_span_carries_its_proximity_and_the_weight_moves_the_choice(tokenizer):
    from trm.reading.grounded import proximity_to_question, score_replies

    passage = "Rotterdam is a port. " + "The city grew fast in the last century and trade grew with it. " * 2 + \
        "The Rhine ends in the North Sea near Hoek van Holland."
    question = "Where does the Rhine end?"
    settings = GroundedSettings(max_answer_tokens=6, start_candidates=100)
    scored = score_replies(_random_model(seed=5, positions=256), tokenizer, passage, question, settings)
    for text, start, *_, proximity in scored.spans:
        assert passage[start:start + len(text)] == text
        assert proximity == pytest.approx(proximity_to_question(passage, question, [(start, start + len(text))])[0])
    closest = max(proximity for *_, proximity in scored.spans)
    chosen = scored.answer(replace(settings, proximity_weight=1e6))
    assert [p for text, start, *_, p in scored.spans if (text, start) == (chosen.span, chosen.char_start)] == [closest]
    assert closest > 0
    assert scored.answer(replace(settings, proximity_weight=0.0)).span_score < chosen.span_score


def test_the_length_bonus_rewards_each_token_of_a_span(tokenizer):
    from trm.reading.grounded import score_replies

    passage, question = "The Rhine ends in the North Sea near Hoek van Holland.", "Where does the Rhine end?"
    settings = GroundedSettings(max_answer_tokens=6, start_candidates=100, proximity_weight=0.0, length_bonus=0.0)
    scored = score_replies(_random_model(seed=6), tokenizer, passage, question, settings)
    for text, _, _, _, tokens, _ in scored.spans:  # a span's tokens are the reply's, its end token aside
        assert tokens == len(tokenizer(" " + text)["input_ids"])
    plain = scored.answer(settings)
    longest = scored.answer(replace(settings, length_bonus=1e3))
    assert len(tokenizer(" " + longest.span)["input_ids"]) == max(tokens for *_, tokens, _ in scored.spans)
    # The bonus is the span's alone: the no-answer reply's score does not move, so the margin grows with it.
    assert longest.no_answer_score == plain.no_answer_score
    bonus = 0.25
    bonused = scored.answer(replace(settings, length_bonus=bonus))
    assert bonused.span_score == pytest.approx(max(score - settings.prior_weight * prior + bonus * tokens
                                                   for _, _, score, prior, tokens, _ in scored.spans))


def test_spans_start_and_end_at_whole_words(tokenizer):
    tokens = tokenizer.convert_ids_to_tokens(tokenizer(" Hoek van Holland, 1,233 km.")["input_ids"])
    assert tokens == ["ĠHo", "ek", "Ġvan", "ĠHolland", ",", "Ġ1", ",", "233", "Ġkm", "."]
    starts, ends = _word_boundaries(tokens)
    assert starts == [True, False, True, True, False, True, False, False, True, False]
    # "Ho" cannot end a span (the word goes on), "1" can ("1" or "1,233"), and so can the final ".".
    assert ends == [False, True, True, True, True, True, False, True, True, True]


def test_settings_are_stored_beside_the_model(tmp_path):
    GroundedSettings(no_answer_threshold=1.25, start_candidates=9).save(tmp_path)
    loaded = GroundedSettings.for_model(tmp_path, no_answer_threshold=None, max_answer_tokens=4)
    assert loaded.no_answer_threshold == 1.25 and loaded.start_candidates == 9 and loaded.max_answer_tokens == 4
    assert GroundedSettings.for_model(tmp_path / "elsewhere") == GroundedSettings()
    (tmp_path / "grounding.json").write_text("{not json")
    with pytest.raises(DataError, match="not valid JSON"):
        GroundedSettings.for_model(tmp_path)
    assert json.loads(GroundedSettings().save(tmp_path).read_text())["no_answer_threshold"] == 0.0
    # A file calibrated before a weight (or the near-question starts) existed keeps it off: its threshold was set without it.
    (tmp_path / "grounding.json").write_text(json.dumps({"no_answer_threshold": -1.5}))
    older = GroundedSettings.for_model(tmp_path)
    assert (older.no_answer_threshold, older.prior_weight, older.proximity_weight, older.length_bonus,
            older.starts_near_question) == (-1.5, 0.0, 0.0, 0.0, 0)
    assert GroundedSettings.for_model(tmp_path, proximity_weight=3.0).proximity_weight == 3.0


def test_calibration_can_require_a_share_of_abstentions():
    margins = [-2.0, -1.0, 0.0, 1.0, 2.0, 3.0]
    has_answer = [True, False, True, False, True, False]
    span_f1 = [1.0, 0.0, 1.0, 0.0, 1.0, 0.0]
    # Abstaining on at least 2 of the 3 unanswerable questions: best is the threshold 1.0 (abstain on
    # margins <= 1), which still answers the answerable question at margin 2: HasAns F1 1/3.
    threshold, has_answer_f1 = calibrate_no_answer_threshold(margins, span_f1, has_answer, min_no_answer=0.66)
    assert threshold == 1.0 and has_answer_f1 == pytest.approx(100 / 3)
    threshold, has_answer_f1 = calibrate_no_answer_threshold(margins, span_f1, has_answer, min_no_answer=1.0)
    assert threshold == 3.0 and has_answer_f1 == 0.0


def test_calibration_chooses_exactly_the_weights_the_command_lines_override():
    from dataclasses import fields

    from trm.evaluation import WEIGHT_CHOICES
    from trm.reading.grounded import WEIGHT_HELP

    assert list(WEIGHT_CHOICES) == list(WEIGHT_HELP)
    assert set(WEIGHT_HELP) <= {f.name for f in fields(GroundedSettings)}
    for name, values in WEIGHT_CHOICES.items():  # the default (no stored choice) is among the choices, smaller first
        assert getattr(GroundedSettings(), name) in values and list(values) == sorted(values) and values[0] == 0.0
