"""Generation stops at the end token, chat is scriptable, and the evaluation numbers are computed correctly."""

import io
import json
import math

import pytest
import torch

import run_chat
import run_eval
from data.files import DataError
from data.prompt_format import NO_ANSWER_REPLY
from trm.evaluation import blocks_perplexity, token_byte_lengths
from trm.generation import SamplingSettings, fit_history, generate_reply

from conftest import EOS, model_preferring


def test_generation_stops_at_the_end_token(tokenizer):
    model = model_preferring(EOS, strength=50.0)
    reply, ended = generate_reply(model, tokenizer, [{"role": "user", "content": "Hi"}], SamplingSettings(max_new_tokens=20, greedy=True))
    assert ended and reply == ""
    word = tokenizer(" yes")["input_ids"][0]
    model = model_preferring(word, strength=50.0)
    reply, ended = generate_reply(model, tokenizer, [{"role": "user", "content": "Hi"}], SamplingSettings(max_new_tokens=5, greedy=True, repetition_penalty=1.0, no_repeat_ngram_size=0))
    assert not ended and reply == "yes yes yes yes yes"


def test_repetition_controls_apply_to_the_reply_alone_so_a_passage_can_be_copied(tokenizer, model_dir):
    """transformers' n-gram ban counts the prompt: a reply could never repeat three tokens of a passage (an
    answer span) nor the no-answer reply an instruction names. TRM's bans the reply's own repeats only."""
    from trm.generation import load_model

    word = tokenizer(" yes")["input_ids"][0]
    model = model_preferring(word, strength=50.0)
    messages = [{"role": "user", "content": "yes yes yes"}]  # the prompt holds the 3-gram " yes yes yes"
    settings = SamplingSettings(max_new_tokens=4, greedy=True, repetition_penalty=1.0, no_repeat_ngram_size=3)
    reply, _ = generate_reply(model, tokenizer, messages, settings)
    assert reply.split()[:3] == ["yes", "yes", "yes"] and reply != "yes yes yes yes"  # copied once, never looped
    # A saved model's generation config (prompt-wide bans) does not come back in through the model either.
    saved, _ = load_model(model_dir)
    assert saved.generation_config.no_repeat_ngram_size == 3
    kwargs = SamplingSettings(repetition_penalty=1.3).generate_kwargs(prompt_length=7)
    assert kwargs["no_repeat_ngram_size"] == 0 and kwargs["repetition_penalty"] == 1.0
    penalty, ngrams = kwargs["logits_processor"]
    assert penalty.prompt_ignore_length == 7 and penalty.penalty == 1.3 and ngrams.prompt_length == 7


def test_history_is_trimmed_oldest_first(tokenizer):
    messages = [{"role": "system", "content": "Be kind."}]
    for i in range(20):
        messages += [{"role": "user", "content": f"question number {i} " * 3}, {"role": "assistant", "content": f"answer {i}"}]
    messages.append({"role": "user", "content": "last question"})
    fitted = fit_history(messages, tokenizer, max_prompt_tokens=60)
    assert fitted[0]["role"] == "system" and fitted[-1]["content"] == "last question" and len(fitted) < len(messages)
    assert fit_history([{"role": "user", "content": "word " * 200}], tokenizer, 60) is None


def test_scripted_chat_reads_turns_resets_and_exits(model_dir, monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", io.StringIO("Hello\n/reset\nAgain\n/exit\nnever read\n"))
    run_chat.main([str(model_dir), "--max_new_tokens", "8", "--temperature", "0"])
    out = capsys.readouterr().out
    assert out.count("assistant>") == 2 and "(history cleared)" in out and "cut at max_new_tokens" not in out


def test_bits_per_byte_and_perplexity_are_consistent(tokenizer):
    model = model_preferring(EOS, strength=1.0)
    blocks = [tokenizer("The river flows through the old town and past the mill.")["input_ids"]]
    result = blocks_perplexity(model, blocks, tokenizer)
    ids = torch.tensor(blocks)
    with torch.no_grad():
        stock_loss = model(ids, labels=ids).loss.item()
    assert result["loss"] == pytest.approx(stock_loss, rel=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(stock_loss), rel=1e-5)
    assert result["bytes"] == len(" river flows through the old town and past the mill.".encode())
    assert result["bits_per_byte"] == pytest.approx(stock_loss * result["tokens"] / math.log(2) / result["bytes"], rel=1e-6)
    lengths = token_byte_lengths(tokenizer)
    assert lengths[EOS] == 0 and lengths[tokenizer.convert_tokens_to_ids("Ġthe")] == 4


def test_squad_metric_against_hand_computed_cases():
    import evaluate

    from trm.evaluation import SQUAD_METRIC_DIR

    metric = evaluate.load(str(SQUAD_METRIC_DIR))
    scores = metric.compute(
        predictions=["The Eiffel Tower!", "in Paris France", "", "Rollo"],
        references=[["Eiffel Tower"], ["Paris", "Paris, France"], [], []],
    )
    # EM: 1 ("the" and "!" normalise away), 0 ("in" is no article), 1 (empty for no answer), 0.
    # F1 of "in paris france": best over golds, vs "paris france" P=2/3 R=1 -> 0.8 (vs "paris" only 0.5).
    assert scores["HasAns_exact"] == pytest.approx(50.0) and scores["HasAns_f1"] == pytest.approx(90.0)
    assert scores["NoAns_exact"] == pytest.approx(50.0) and scores["NoAns_total"] == 2
    assert scores["exact"] == pytest.approx(50.0) and scores["f1"] == pytest.approx(70.0)
    partial = metric.compute(predictions=["in Paris"], references=[["Paris, France"]])
    assert partial["exact"] == 0.0 and partial["f1"] == pytest.approx(100 * 2 * 0.5 * 0.5 / (0.5 + 0.5))


def test_run_eval_writes_a_report(model_dir, tmp_path):
    text = tmp_path / "held_out.txt"
    text.write_text("The river flows through the old town.\nParis is the capital of France.\n")
    squad = tmp_path / "squad.json"
    squad.write_text(json.dumps({"version": "v2.0", "data": [{"title": "t", "paragraphs": [{"context": "Rollo led the Normans.", "qas": [
        {"id": "1", "question": "Who led the Normans?", "answers": [{"text": "Rollo", "answer_start": 0}]},
        {"id": "2", "question": "Who led the Danes?", "answers": [], "is_impossible": True}]}]}]}))
    instructions = tmp_path / "instructions.txt"
    instructions.write_text("Say hi.\nName a colour.\n")
    report = run_eval.main([str(model_dir), "--text_file", str(text), "--squad_v2_file", str(squad),
                            "--instructions_file", str(instructions), "--max_new_tokens", "8"])
    saved = json.loads((model_dir / "eval_report.json").read_text())
    assert saved["text"]["tokens"] > 0 and saved["text"]["perplexity"] == pytest.approx(report["text"]["perplexity"])
    # The model ends every reply at once: empty answers are right only for the unanswerable question.
    assert saved["squad_v2.0 free"]["HasAns_exact"] == 0.0 and saved["squad_v2.0 free"]["NoAns_exact"] == 100.0
    # Grounded decoding scores replies instead: a short span ending at once beats the long no-answer reply.
    grounded = saved["squad_v2.0 grounded"]
    assert grounded["decoding"] == "grounded" and grounded["total"] == 2
    assert all(e["reply"] in "Rollo led the Normans." for e in grounded["examples"])
    assert saved["instructions"]["ended_by_itself"] == 1.0 and saved["instructions"]["in_format"] == 0.0


def test_squad_scores_say_how_often_the_model_abstains_and_how_good_its_answers_are(tokenizer, tmp_path, monkeypatch):
    import trm.evaluation as evaluation

    squad = tmp_path / "squad.json"
    squad.write_text(json.dumps({"version": "1.1", "data": [{"title": "t", "paragraphs": [{"context": "Rollo led the Normans in 911.", "qas": [
        {"id": str(i), "question": q, "answers": [{"text": a, "answer_start": 0}]}
        for i, (q, a) in enumerate([("Who led the Normans?", "Rollo"), ("When?", "911"), ("Whom did Rollo lead?", "the Normans")])]}]}]}))
    replies, banned = iter(["Rollo", NO_ANSWER_REPLY, "in 1066", "Normans"]), []

    def reply(model, tokenizer, messages, settings):
        banned.append(settings.banned_first_tokens)
        return next(replies), True

    monkeypatch.setattr(evaluation, "generate_reply", reply)
    scores = evaluation.squad_evaluation(model_preferring(EOS, strength=0.0), tokenizer, str(squad), limit=None)
    # A v1.1 question is known to be answerable: the no-answer reply is asked again with its first token barred.
    no_answer_start = tokenizer(" " + NO_ANSWER_REPLY)["input_ids"][0]
    assert banned == [(), (), (no_answer_start,), ()]
    assert scores["abstained"] == pytest.approx(100 / 3)  # what the model chose of its own accord
    assert scores["answered_f1"] == pytest.approx(200 / 3)  # "Normans" matches "the Normans" once articles are dropped
    assert scores["f1"] == pytest.approx(200 / 3) and scores["examples"][1]["reply"] == "in 1066"
    # A v2.0 question may lack an answer: its no-answer reply stands.
    replies, banned[:] = iter(["Rollo", NO_ANSWER_REPLY, "Normans"]), []
    scores = evaluation.squad_evaluation(model_preferring(EOS, strength=0.0), tokenizer, str(squad), limit=None, source="squad_v2")
    assert banned == [(), (), ()] and scores["examples"][1]["reply"] == NO_ANSWER_REPLY
    assert scores["abstained"] == pytest.approx(100 / 3)


def test_a_reply_can_be_barred_from_its_likeliest_first_token(tokenizer):
    the = tokenizer(" The")["input_ids"][0]
    model = model_preferring(the, strength=50.0)
    messages = [{"role": "user", "content": "Who led the Normans?"}]
    free = SamplingSettings(max_new_tokens=3, greedy=True)
    assert tokenizer(" " + generate_reply(model, tokenizer, messages, free)[0])["input_ids"][0] == the
    barred = SamplingSettings(max_new_tokens=3, greedy=True, banned_first_tokens=(the,))
    reply = tokenizer(" " + generate_reply(model, tokenizer, messages, barred)[0])["input_ids"]
    assert reply[0] != the and the in reply[1:]  # only the first token is barred


def test_run_eval_refuses_an_empty_instructions_file(model_dir, tmp_path):
    empty = tmp_path / "instructions.txt"
    empty.write_text("\n  \n")
    with pytest.raises(DataError, match="holds no instructions"):
        run_eval.main([str(model_dir), "--instructions_file", str(empty)])


def test_calibration_stores_a_threshold_that_grounded_evaluation_then_uses(model_dir, tmp_path):
    squad = tmp_path / "squad.json"
    squad.write_text(json.dumps({"version": "v2.0", "data": [{"title": "t", "paragraphs": [{"context": "Rollo led the Normans.", "qas": [
        {"id": "1", "question": "Who led the Normans?", "answers": [{"text": "Rollo", "answer_start": 0}]},
        {"id": "2", "question": "Who led the Danes?", "answers": [], "is_impossible": True},
        {"id": "3", "question": "Who led the Franks?", "answers": [], "is_impossible": True}]}]}]}))
    report = run_eval.main([str(model_dir), "--calibrate_no_answer", str(squad), "--squad_v2_file", str(squad), "--decoding", "grounded"])
    stored = json.loads((model_dir / "grounding.json").read_text())
    assert stored["no_answer_threshold"] == pytest.approx(report["calibration"]["no_answer_threshold"])
    for name in ("prior_weight", "proximity_weight", "length_bonus"):
        assert stored[name] == report["calibration"][name]
    # The evaluation that follows uses the stored threshold and reaches the F1 calibration promised.
    assert report["squad_v2.0 grounded"]["f1"] == pytest.approx(report["calibration"]["f1_at_threshold"])
    assert "squad_v2.0 free" not in report
    with pytest.raises(DataError, match="answerable and unanswerable"):
        run_eval.main([str(model_dir), "--calibrate_no_answer", str(squad), "--limit", "1"])


def test_chat_answers_from_a_passage_and_from_the_index(model_dir, tmp_path, monkeypatch, capsys):
    import run_index

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("The Rhine ends in the North Sea.\n\nOxygen was discovered in 1771.\n")
    run_index.main(["--corpus", str(corpus), "--index", str(tmp_path / "index.sqlite")])
    passage = "Rollo led the Normans into Francia."
    monkeypatch.setattr("sys.stdin", io.StringIO(
        f"/passage {passage}\nWho led the Normans?\n/passage\nHello\n/ask When was oxygen discovered?\n/exit\n"))
    run_chat.main([str(model_dir), "--max_new_tokens", "8", "--temperature", "0", "--index", str(tmp_path / "missing.sqlite")])
    assert "no passage index at" in capsys.readouterr().out  # the chat said so and went on to /exit
    monkeypatch.setattr("sys.stdin", io.StringIO(
        f"/passage {passage}\nWho led the Normans?\n/passage\nHello\n/ask When was oxygen discovered?\n/exit\n"))
    capsys.readouterr()
    run_chat.main([str(model_dir), "--max_new_tokens", "8", "--temperature", "0", "--index", str(tmp_path / "index.sqlite")])
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith("assistant>")]
    grounded_answer = lines[0].removeprefix("assistant> ")
    assert grounded_answer in passage or grounded_answer == NO_ANSWER_REPLY
    assert lines[1] == "assistant>"  # free chat again: this model ends every reply at once
    assert len(lines) == 3 and "  source: [corpus] Oxygen was discovered in 1771." in out.splitlines()


def test_copying_probe_separates_a_model_that_copies_from_one_that_cannot():
    from trm.evaluation import copying_loss

    untrained = model_preferring(EOS, strength=0.0)
    untrained.train()
    losses = copying_loss(untrained, half=16, rows=4)
    assert untrained.training  # the probe leaves the model's mode as it found it
    assert abs(losses["copy_loss"] - losses["random_loss"]) < 0.5  # no copying: both copies equally unknown

    class Copier(torch.nn.Module):
        """Predicts the token that followed the previous occurrence of the current token (an induction head)."""

        def __init__(self, inner):
            super().__init__()
            self.config, self.lm_head, self.device, self.training = inner.config, inner.lm_head, torch.device("cpu"), False
            self.inner = inner

        def forward(self, input_ids, attention_mask=None, **kwargs):
            wanted = torch.full_like(input_ids, EOS)
            for row in range(input_ids.shape[0]):
                last_seen = {}
                for t in range(input_ids.shape[1]):
                    token = int(input_ids[row, t])
                    if token in last_seen:
                        wanted[row, t] = input_ids[row, last_seen[token] + 1]
                    last_seen[token] = t
            hidden = 1e4 * torch.nn.functional.normalize(self.lm_head.weight[wanted], dim=-1)
            return type("Output", (), {"hidden_states": (hidden,)})()

        def eval(self):
            return self

        def train(self, mode=True):
            return self

    copier = Copier(model_preferring(EOS, strength=0.0))
    losses = copying_loss(copier, half=16, rows=4)
    assert losses["copy_loss"] < losses["random_loss"] - 3.0


def test_loading_a_model_prints_no_progress_bar_and_leaves_the_setting_as_it_was(model_dir, capfd):
    from transformers.utils import logging as transformers_logging

    from trm.generation import load_model

    transformers_logging.enable_progress_bar()
    load_model(model_dir)
    assert "Loading weights" not in capfd.readouterr().err  # what a chat or `make ask` prints stays its own
    assert transformers_logging.is_progress_bar_enabled()
