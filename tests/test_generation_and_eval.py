"""Generation stops at the end token, chat is scriptable, and the evaluation numbers are computed correctly."""

import io
import json
import math

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

import run_chat
import run_eval
from data.files import DataError
from trm.evaluation import blocks_perplexity, token_byte_lengths
from trm.generation import SamplingSettings, fit_history, generate_reply
from trm.training import default_generation_config

from conftest import TINY_CONFIG

EOS = 50256


def _model_preferring(token_id: int, strength: float) -> GPT2LMHeadModel:
    """A tiny GPT-2 whose every next-token distribution peaks at `token_id` (via the tied embedding)."""
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(**TINY_CONFIG)).eval()
    with torch.no_grad():
        direction = torch.randn(TINY_CONFIG["n_embd"])
        direction /= direction.norm()
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.copy_(direction)
        model.transformer.wte.weight[token_id] = direction * strength
    return model


@pytest.fixture()
def model_dir(tmp_path, tokenizer):
    model = _model_preferring(EOS, strength=50.0)
    model.generation_config = default_generation_config(tokenizer)
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    return tmp_path / "model"


def test_generation_stops_at_the_end_token(tokenizer):
    model = _model_preferring(EOS, strength=50.0)
    reply, ended = generate_reply(model, tokenizer, [{"role": "user", "content": "Hi"}], SamplingSettings(max_new_tokens=20, greedy=True))
    assert ended and reply == ""
    word = tokenizer(" yes")["input_ids"][0]
    model = _model_preferring(word, strength=50.0)
    reply, ended = generate_reply(model, tokenizer, [{"role": "user", "content": "Hi"}], SamplingSettings(max_new_tokens=5, greedy=True, repetition_penalty=1.0))
    assert not ended and reply == "yes yes yes yes yes"


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
    model = _model_preferring(EOS, strength=1.0)
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
    assert saved["squad_v2.0"]["HasAns_exact"] == 0.0 and saved["squad_v2.0"]["NoAns_exact"] == 100.0
    assert saved["instructions"]["ended_by_itself"] == 1.0 and saved["instructions"]["in_format"] == 0.0


def test_run_eval_refuses_an_empty_instructions_file(model_dir, tmp_path):
    empty = tmp_path / "instructions.txt"
    empty.write_text("\n  \n")
    with pytest.raises(DataError, match="holds no instructions"):
        run_eval.main([str(model_dir), "--instructions_file", str(empty)])
