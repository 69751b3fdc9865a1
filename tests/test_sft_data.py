import json

import pytest

from data.files import DataError, SkipCounter
from data.instruction_sources import detokenize_dialogue, load_source
from data.prompt_format import CHAT_TEMPLATE, NO_ANSWER_REPLY, render
from data.sft import IGNORE_INDEX, SftDataArguments, encode_conversation, encode_messages, prepare_sft_data
from trm.rules import RuleViolation

PASSAGE = ("The Normans were the people who in the 10th and 11th centuries gave their name to Normandy, a region in France. "
           "They were descended from Norse raiders and pirates from Denmark, Iceland and Norway. ")


def _squad_file(path, version, long_passage=False):
    context = PASSAGE * (12 if long_passage else 1) + "Their leader was Rollo."
    qas = [{"id": "1", "question": "Who was their leader?", "answers": [{"text": "Rollo", "answer_start": context.index("Rollo")}]}]
    if version == "v2.0":
        qas.append({"id": "2", "question": "Who was their queen?", "answers": [], "is_impossible": True})
    qas.append({"id": "3", "question": "", "answers": []})
    path.write_text(json.dumps({"version": version, "data": [{"title": "Normans", "paragraphs": [{"context": context, "qas": qas}]}]}))
    return path


def _load(source, path):
    skipped = SkipCounter()
    return list(load_source(source, str(path), skipped)), skipped


def test_alpaca_with_and_without_input(tmp_path):
    path = tmp_path / "alpaca.json"
    path.write_text(json.dumps([
        {"instruction": "Name a colour.", "input": "", "output": "Blue."},
        {"instruction": "Translate to French.", "input": "cat", "output": "chat"},
        {"instruction": "No output here.", "input": ""},
        {"instruction": "", "input": "", "output": "orphan"},
    ]))
    conversations, skipped = _load("alpaca", path)
    assert [c.messages[0]["content"] for c in conversations] == ["Name a colour.", "Translate to French.\n\ncat"]
    assert skipped == {"records without instruction/output": 1, "records with an empty instruction or output": 1}


def test_squad_v1_and_v2(tmp_path):
    v1, skipped = _load("squad", _squad_file(tmp_path / "v1.json", "1.1"))
    assert len(v1) == 1 and v1[0].answers == ["Rollo"] and skipped == {"questions without a passage or question text": 1}
    v2, _ = _load("squad_v2", _squad_file(tmp_path / "v2.json", "v2.0"))
    assert [c.answers for c in v2] == [["Rollo"], []]


def test_unanswerable_questions_get_the_fixed_reply(tmp_path, tokenizer):
    v2, _ = _load("squad_v2", _squad_file(tmp_path / "v2.json", "v2.0"))
    row = encode_conversation(v2[1], tokenizer, 256, SkipCounter())
    reply = tokenizer.decode([t for t in row["labels"] if t != IGNORE_INDEX])
    assert reply == f" {NO_ANSWER_REPLY}<|endoftext|>"


def test_long_passages_are_windowed_around_the_answer(tmp_path, tokenizer):
    conversations, _ = _load("squad", _squad_file(tmp_path / "long.json", "1.1", long_passage=True))
    counts = SkipCounter()
    row = encode_conversation(conversations[0], tokenizer, 256, counts)
    assert row["length"] <= 256 and counts == {"shortened: passage windowed around the answer": 1}
    text = tokenizer.decode(row["input_ids"])
    assert "Their leader was Rollo" in text and text.endswith("Assistant: Rollo<|endoftext|>")


def test_dailydialog_original_format(tmp_path):
    path = tmp_path / "dialogues_train.txt"
    path.write_text("Say , Jim , how about a beer ? __eou__ You know that is tempting . __eou__ What do you mean ? __eou__\n"
                    "Hello ! __eou__\n"
                    "A line of plain text without turn separators.\n")
    conversations, skipped = _load("dailydialog", path)
    assert len(conversations) == 1
    assert conversations[0].messages == [
        {"role": "user", "content": "Say, Jim, how about a beer?"}, {"role": "assistant", "content": "You know that is tempting."},
    ]
    # Each dialogue is counted once, under the one reason that applies to it.
    assert skipped == {"final unanswered turns dropped (dialogue kept)": 1, "dialogues with fewer than two turns": 2}
    assert detokenize_dialogue("I don't know , it ' s fine .") == "I don't know, it's fine."


def test_chat_jsonl_counts_malformed_records_and_refuses_retrieval(tmp_path):
    path = tmp_path / "chat.jsonl"
    path.write_text("\n".join([
        json.dumps({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]}),
        json.dumps({"messages": [{"role": "assistant", "content": "wrong order"}]}),
        json.dumps({"messages": [{"role": "user", "content": "no reply"}]}),
        "{broken",
    ]))
    conversations, skipped = _load("chat", path)
    assert len(conversations) == 1
    assert skipped == {"records with malformed messages": 1, "records that do not end with an assistant reply": 1,
                       "JSON lines that do not parse": 1}
    rag = tmp_path / "rag.jsonl"
    rag.write_text(json.dumps({"messages": [], "retrieved_passages": ["..."]}))
    with pytest.raises(RuleViolation, match="retrieval"):
        _load("chat", rag)


def test_only_replies_and_their_end_token_carry_labels(tokenizer):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
                {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Bye"},
                {"role": "assistant", "content": "Goodbye."}]
    ids, labels = encode_messages(messages, tokenizer)
    labelled = [i for i, label in enumerate(labels) if label != IGNORE_INDEX]
    assert tokenizer.decode([ids[i] for i in labelled]) == " Hello!<|endoftext|> Goodbye.<|endoftext|>"
    assert all(labels[i] == ids[i] for i in labelled)
    prompt_text = tokenizer.decode([t for t, l in zip(ids, labels) if l == IGNORE_INDEX])
    assert prompt_text == "Be brief.\nUser: Hi there\nAssistant:User: Bye\nAssistant:"


def test_chat_template_renders_the_training_format(tokenizer):
    import random

    assert tokenizer.chat_template == CHAT_TEMPLATE
    rng = random.Random(0)
    pieces = ["Hi", "  padded question  ", "Hello!\n", "Line one\nline two", "Ünïcode — ok?", " x ", "Say 7."]
    for _ in range(40):
        turns = rng.randint(1, 3)
        messages = [{"role": "system", "content": rng.choice(pieces)}] if rng.random() < 0.3 else []
        for _turn in range(turns):
            messages += [{"role": "user", "content": rng.choice(pieces)}, {"role": "assistant", "content": rng.choice(pieces)}]
        for conversation, add in ((messages, False), (messages[:-1], True)):
            assert tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=add) == render(conversation, add)[0]
        encoded = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
        ids, labels = encode_messages(messages, tokenizer)
        assert encoded["input_ids"] == ids
        assert encoded["assistant_masks"] == [int(label != IGNORE_INDEX) for label in labels]


def test_mix_caps_and_disjoint_validation(tmp_path, tokenizer):
    alpaca = tmp_path / "alpaca.json"
    alpaca.write_text(json.dumps([{"instruction": f"Count to {i}.", "input": "", "output": " ".join(map(str, range(1, i % 9 + 2)))}
                                  for i in range(300)]))
    dialogues = tmp_path / "dialogues_train.txt"
    dialogues.write_text("".join(f"Hello number {i} . __eou__ Hi {i} ! __eou__\n" for i in range(80)))
    args = SftDataArguments(data_cache_dir=str(tmp_path / "cache"), alpaca_file=str(alpaca), dailydialog_file=str(dialogues), alpaca_max_examples=50,
                            validation_split_percentage=10.0)
    data, report = prepare_sft_data(args, tokenizer)
    assert report["alpaca"]["train"]["examples"] == 50 and report["dailydialog"]["train"]["examples"] > 50
    train_texts = {tokenizer.decode(ids) for ids in data["train"]["input_ids"]}
    validation_texts = {tokenizer.decode(ids) for ids in data["validation"]["input_ids"]}
    assert validation_texts and not (train_texts & validation_texts)
    assert set(data["train"]["source"]) == {"alpaca", "dailydialog"}


def test_question_first_layout_puts_the_question_before_and_after_the_passage_and_keeps_the_answer(tmp_path, tokenizer):
    conversations, _ = _load("squad", _squad_file(tmp_path / "long.json", "1.1", long_passage=True))
    counts = SkipCounter()
    row = encode_conversation(conversations[0], tokenizer, 256, counts, layout="question_first")
    text = tokenizer.decode(row["input_ids"])
    question, passage = text.index("Question: Who was their leader?"), text.index("Passage: ")
    assert question < passage < text.rindex("Question: Who was their leader?") and len(row["input_ids"]) <= 256
    assert "Rollo" in text[passage:] and tokenizer.decode([t for t in row["labels"] if t != IGNORE_INDEX]) == " Rollo<|endoftext|>"
    assert counts == {"shortened: passage windowed around the answer": 1}
    with pytest.raises(DataError, match="squad_layout must be one of"):
        prepare_sft_data(SftDataArguments(data_cache_dir=str(tmp_path / "cache"), squad_file=str(tmp_path / "long.json"), squad_layout="sideways"), tokenizer)


def test_squad_v2_questions_already_in_v1_can_be_left_out_and_are_counted(tmp_path, tokenizer):
    alpaca = tmp_path / "alpaca.json"  # held-out examples for the run to have a validation split
    alpaca.write_text(json.dumps([{"instruction": f"Task {i}.", "input": "", "output": "Done."} for i in range(10)]))
    args = SftDataArguments(data_cache_dir=str(tmp_path / "cache"), alpaca_file=str(alpaca), squad_file=str(_squad_file(tmp_path / "v1.json", "1.1")),
                            squad_v2_file=str(_squad_file(tmp_path / "v2.json", "v2.0")))
    _, report = prepare_sft_data(args, tokenizer)
    assert report["squad_v2"]["records"] == 2
    args.squad_v2_drop_v1_duplicates = True
    _, report = prepare_sft_data(args, tokenizer)
    assert report["squad_v2"]["records"] == 1  # only the unanswerable question is new
    assert report["squad_v2"]["skipped_or_changed"]["left out: question also in SQuAD v1.1"] == 1


def test_the_unanswerable_share_of_squad_v2_training_is_capped_and_counted(tmp_path, tokenizer):
    paragraphs = [{"context": f"Passage {i} says that river {i} is long.", "qas": [
        {"id": f"a{i}", "question": f"What is long in passage {i}?", "answers": [{"text": f"river {i}", "answer_start": 20}]},
        {"id": f"u{i}", "question": f"Who wrote passage {i}?", "answers": [], "is_impossible": True}]} for i in range(20)]
    v2 = tmp_path / "v2.json"
    v2.write_text(json.dumps({"version": "v2.0", "data": [{"title": "t", "paragraphs": paragraphs}]}))
    args = SftDataArguments(data_cache_dir=str(tmp_path / "cache"), squad_v2_file=str(v2), validation_split_percentage=10.0)
    data, report = prepare_sft_data(args, tokenizer)
    trained = report["squad_v2"]["train"]["examples"]
    args.squad_v2_max_unanswerable = 3
    capped, capped_report = prepare_sft_data(args, tokenizer)
    left_out = capped_report["squad_v2"]["skipped_or_changed"]["left out: unanswerable beyond squad_v2_max_unanswerable"]
    assert capped_report["squad_v2"]["train"]["examples"] == trained - left_out and trained // 2 - left_out == 3
    abstaining = [row for row in capped["train"]
                  if NO_ANSWER_REPLY in tokenizer.decode([t for t in row["labels"] if t != IGNORE_INDEX])]
    assert len(abstaining) == 3 and capped["validation"]["input_ids"] == data["validation"]["input_ids"]


def test_a_passage_shared_by_squad_versions_lands_in_one_split(tmp_path):
    v1, _ = _load("squad", _squad_file(tmp_path / "v1.json", "1.1"))
    v2, _ = _load("squad_v2", _squad_file(tmp_path / "v2.json", "v2.0"))
    assert {c.group for c in v1} == {c.group for c in v2}


def test_a_cap_is_filled_with_examples_that_fit_and_a_source_with_none_is_an_error(tmp_path, tokenizer):
    alpaca = tmp_path / "alpaca.json"
    long_reply = "word " * 400  # can never fit the context
    records = [{"instruction": f"Task {i}.", "input": "", "output": long_reply if i % 2 else f"Done {i}."} for i in range(200)]
    alpaca.write_text(json.dumps(records))
    args = SftDataArguments(data_cache_dir=str(tmp_path / "cache"), alpaca_file=str(alpaca), alpaca_max_examples=40, validation_split_percentage=10.0)
    _, report = prepare_sft_data(args, tokenizer)
    assert report["alpaca"]["train"]["examples"] == 40  # half the records are too long: others took their place
    alpaca.write_text(json.dumps([{**r, "output": long_reply} for r in records]))
    with pytest.raises(DataError, match="alpaca: none of its .* training examples fits the 256-token context"):
        prepare_sft_data(args, tokenizer)


@pytest.mark.parametrize("export", ["parquet", "jsonl", "json"])
def test_local_exports_in_the_hub_layout_read_like_the_original_formats(tmp_path, tokenizer, export):
    """`datasets.Dataset.to_parquet` / `to_json` (JSON lines, also when named .json) exports of the Hub datasets."""
    from datasets import Dataset

    from trm.evaluation import squad_questions

    context = PASSAGE + "Their leader was Rollo."
    squad_v2 = [
        {"id": "1", "title": "Normans", "context": context, "question": "Who was their leader?",
         "answers": {"text": ["Rollo"], "answer_start": [context.index("Rollo")]}},
        {"id": "2", "title": "Normans", "context": context, "question": "Who was their queen?",
         "answers": {"text": [], "answer_start": []}},
        {"id": "3", "title": "Normans", "context": context, "question": "", "answers": {"text": [], "answer_start": []}},
    ]
    alpaca = [{"instruction": f"Say {i}.", "input": "", "output": f"{i}", "text": f"### Instruction: Say {i}."} for i in range(40)]
    dialogues = [{"dialog": [f"Hello , I am {i} .", "Nice to meet you !"], "act": [1, 2], "emotion": [0, 0]} for i in range(40)]

    def export_rows(name, rows):
        path = tmp_path / f"{name}.{export}"
        dataset = Dataset.from_list(rows)
        dataset.to_parquet(str(path)) if export == "parquet" else dataset.to_json(str(path))
        return path

    v2, skipped = _load("squad_v2", export_rows("squad_v2", squad_v2))
    assert [(c.question, c.answers, c.answer_start) for c in v2] == [
        ("Who was their leader?", ["Rollo"], context.index("Rollo")), ("Who was their queen?", [], None)]
    assert skipped == {"questions without a passage or question text": 1}
    v1, skipped = _load("squad", export_rows("squad_v1", squad_v2[:1]))
    assert [c.answers for c in v1] == [["Rollo"]] and not skipped
    assert [q["answers"] for q in squad_questions(str(tmp_path / f"squad_v2.{export}"), None)] == [["Rollo"], []]

    args = SftDataArguments(data_cache_dir=str(tmp_path / "cache"), alpaca_file=str(export_rows("alpaca", alpaca)), squad_file=str(tmp_path / f"squad_v1.{export}"),
                            squad_v2_file=str(tmp_path / f"squad_v2.{export}"),
                            dailydialog_file=str(export_rows("dailydialog", dialogues)), validation_split_percentage=10.0)
    _, report = prepare_sft_data(args, tokenizer)
    assert all(report[source]["train"]["examples"] + report[source]["validation"]["examples"] > 0
               for source in ("alpaca", "squad", "squad_v2", "dailydialog")), report


def test_squad_v2_prompts_say_the_answer_may_be_missing_and_v1_prompts_do_not(tmp_path, tokenizer):
    from data.prompt_format import ABSTAIN_INSTRUCTION, ANSWER_INSTRUCTION

    v1, _ = _load("squad", _squad_file(tmp_path / "v1.json", "1.1"))
    v2, _ = _load("squad_v2", _squad_file(tmp_path / "v2.json", "v2.0"))
    texts = {name: tokenizer.decode(encode_conversation(conversation, tokenizer, 256, SkipCounter())["input_ids"])
             for name, conversation in (("v1.1", v1[0]), ("v2.0 answerable", v2[0]), ("v2.0 unanswerable", v2[1]))}
    assert texts["v1.1"].startswith(f"User: {ANSWER_INSTRUCTION}\n\nQuestion: ")
    assert all(texts[name].startswith(f"User: {ABSTAIN_INSTRUCTION}\n\nQuestion: ") for name in ("v2.0 answerable", "v2.0 unanswerable"))
    legacy = tokenizer.decode(encode_conversation(v2[0], tokenizer, 256, SkipCounter(), abstain_instruction=False)["input_ids"])
    assert legacy.startswith(f"User: {ANSWER_INSTRUCTION}\n\nQuestion: ")  # squad_abstain_instruction: false


def test_evaluation_and_grounding_use_the_instruction_the_model_learned(model_dir, tokenizer, monkeypatch):
    from data.prompt_format import ABSTAIN_INSTRUCTION, ANSWER_INSTRUCTION, squad_instruction_of
    from trm import evaluation
    from trm.generation import load_model

    model, _ = load_model(model_dir)
    assert squad_instruction_of(model, may_abstain=True) == ANSWER_INSTRUCTION  # a model from before the setting
    model.config.squad_abstain_instruction = True
    assert squad_instruction_of(model, may_abstain=True) == ABSTAIN_INSTRUCTION
    assert squad_instruction_of(model, may_abstain=False) == ANSWER_INSTRUCTION
    prompts = []
    monkeypatch.setattr(evaluation, "generate_reply", lambda m, t, messages, s: prompts.append(messages[0]["content"]) or ("", True))
    row = {"context": "Their leader was Rollo.", "question": "Who was their leader?", "answers": ["Rollo"]}
    evaluation.free_squad_answer(model, tokenizer, row, 8, may_abstain=False)
    evaluation.free_squad_answer(model, tokenizer, row, 8, may_abstain=True)
    assert prompts[0].startswith(ANSWER_INSTRUCTION + "\n") and prompts[1].startswith(ABSTAIN_INSTRUCTION + "\n")


def _squad_articles(path, articles: int):
    data = []
    for a in range(articles):
        paragraphs = [{"context": f"Town{a}x{p} lies on the river Ora{a}. Its mayor is Anna{a}x{p}.", "qas": [
            {"id": f"{a}-{p}a", "question": f"Who is the mayor of Town{a}x{p}?",
             "answers": [{"text": f"Anna{a}x{p}", "answer_start": 0}]},
            {"id": f"{a}-{p}b", "question": f"Who founded Town{a}x{p}?", "answers": [], "is_impossible": True}]} for p in range(3)]
        data.append({"title": f"Article{a}", "paragraphs": paragraphs})
    path.write_text(json.dumps({"version": "v2.0", "data": data}))
    return path


def test_squad_is_held_out_by_article_and_held_out_v2_questions_are_kept_for_calibration(tmp_path, tokenizer):
    v2 = _squad_articles(tmp_path / "v2.json", 20)
    args = SftDataArguments(data_cache_dir=str(tmp_path / "cache"), squad_v2_file=str(v2), validation_split_percentage=20.0)
    data, report = prepare_sft_data(args, tokenizer)
    calibration = data["calibration"]
    held_out = set(calibration["title"])
    trained_text = " ".join(tokenizer.decode(ids) for ids in data["train"]["input_ids"])
    assert held_out and all(f"Town{title[7:]}x" not in trained_text for title in held_out)  # no held-out article trained on
    assert report["squad_v2"]["calibration_questions"] == len(calibration) == 6 * len(held_out)
    assert {bool(answers) for answers in calibration["answers"]} == {True, False}


def test_a_passage_and_its_questions_become_one_example_with_every_answer_labelled(tmp_path, tokenizer):
    from data.instruction_sources import Conversation
    from data.sft import encode_passage_questions

    passage = "Rollo led the Normans. They settled in Normandy in 911. Their language was Norman French."
    asked = [("Who led the Normans?", "Rollo"), ("When did they settle?", "911"), ("Who ruled the Franks?", None),
             ("What was their language?", "Norman French")]
    questions = [Conversation("squad_v2", "p", passage=passage, question=q, answers=[a] if a else [],
                              answer_start=passage.index(a) if a else None) for q, a in asked]
    counts = SkipCounter()
    [(row, count)] = encode_passage_questions(questions, tokenizer, 256, counts)
    text = tokenizer.decode(row["input_ids"])
    assert count == 4 and text.count("Passage: ") == 1 and text.count(passage) == 1
    labelled = tokenizer.decode([t for t in row["labels"] if t != IGNORE_INDEX])
    assert labelled == f" Rollo<|endoftext|> 911<|endoftext|> {NO_ANSWER_REPLY}<|endoftext|> Norman French<|endoftext|>"
    assert "User: Question: When did they settle?\nAssistant: 911" in text

    long_passage = PASSAGE * 12 + passage  # too long for 128 tokens: windows around answers far apart
    far = [Conversation("squad", "p", passage=long_passage, question=q, answers=[a], answer_start=long_passage.index(a))
           for q, a in (("Who led the Normans?", "Rollo"), ("What was their language?", "Norman French"))]
    far.append(Conversation("squad", "p", passage=long_passage, question="What came first?", answers=["The Normans"],
                            answer_start=0))
    counts = SkipCounter()
    rows = encode_passage_questions(far, tokenizer, 128, counts)
    assert sum(count for _, count in rows) == 3 and all(len(row["input_ids"]) <= 128 for row, _ in rows)
    for row, _ in rows:  # no answer is ever cut: each labelled answer is in its window
        text = tokenizer.decode(row["input_ids"])
        window = text[text.index("Passage: "):]
        for answer in tokenizer.decode([t for t in row["labels"] if t != IGNORE_INDEX]).split("<|endoftext|>")[:-1]:
            assert answer.strip() in window.split("\nAssistant:")[0]
    assert counts["passage read again (answers far apart, or turns beyond the context)"] == len(rows) - 1 >= 1


def test_grouped_squad_counts_questions_against_the_cap(tmp_path, tokenizer):
    v2 = _squad_articles(tmp_path / "v2.json", 10)
    args = SftDataArguments(data_cache_dir=str(tmp_path / "cache"), squad_v2_file=str(v2), validation_split_percentage=20.0,
                            squad_group_by_passage=True, squad_v2_max_examples=20)
    _, report = prepare_sft_data(args, tokenizer)
    train = report["squad_v2"]["train"]
    assert train["questions"] >= 20 and train["questions"] == 2 * train["examples"]  # two questions per passage


@pytest.mark.parametrize("grouped", [False, True])
def test_rows_kept_within_caps_are_those_a_capped_preparation_keeps(tmp_path, tokenizer, grouped):
    """fill_train_hours prepares once uncapped; cutting that pool to any caps gives the capped preparation's rows."""
    from data.sft import within_caps

    v2 = _squad_articles(tmp_path / "v2.json", 12)
    alpaca = tmp_path / "alpaca.json"
    alpaca.write_text(json.dumps([{"instruction": f"Task {i}.", "input": "", "output": f"Done {i}."} for i in range(40)]))
    common = dict(squad_v2_file=str(v2), alpaca_file=str(alpaca), validation_split_percentage=10.0, squad_group_by_passage=grouped)
    pool, pool_report = prepare_sft_data(SftDataArguments(data_cache_dir=str(tmp_path / "pool"), fill_train_hours=True, **common), tokenizer)
    assert pool_report["squad_v2"]["train"]["questions"] > 7 and pool_report["alpaca"]["train"]["examples"] > 11
    capped_args = SftDataArguments(data_cache_dir=str(tmp_path / "capped"), squad_v2_max_examples=7, alpaca_max_examples=11, **common)
    capped, capped_report = prepare_sft_data(capped_args, tokenizer)
    kept, kept_report = within_caps(pool, pool_report, {"squad_v2": 7, "alpaca": 11})
    assert sorted(kept["train"]["input_ids"]) == sorted(capped["train"]["input_ids"])
    assert sorted(kept["train"]["labels"]) == sorted(capped["train"]["labels"])
    for source in ("squad_v2", "alpaca"):
        assert kept_report[source]["train"] == capped_report[source]["train"]
        assert kept_report[source]["train_cap"] == capped_report[source]["train_cap"]
    assert kept["validation"]["input_ids"] == capped["validation"]["input_ids"]
