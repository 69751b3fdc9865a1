"""The user's hard rules, enforced in one place.

1. Phase 1 trains on plain text only: instruction, question-answering and dialogue data are refused.
2. No retrieval (RAG) data is mixed into training, in either phase.
3. Phase 1 starts from random weights: no pretrained model may be loaded.
4. The GPT-2 tokenizer, never retrained.
5. CPU only by default: a GPU is used only when a recipe sets `use_cpu: false`. (Not a user rule, but checked
   here too: half precision on a CPU that would run it far slower than fp32.)
6. Epoch caps: at most 3 epochs in phase 1 and 2 in phase 2, also when `max_steps` is given.

Every check raises `RuleViolation` with one sentence naming the rule and what broke it; the entry points
print it and exit with status 2.
"""

from __future__ import annotations

from pathlib import Path

MAX_EPOCHS = {"pretraining": 3, "instruction_tuning": 2}

# Field sets that identify a record as something other than plain running text.
INSTRUCTION_SCHEMAS = {
    "Alpaca-style instruction data": {"instruction", "output"},
    "question-answering data (SQuAD-style)": {"question", "context"},
    "question-answering data (SQuAD-style answers)": {"question", "answers"},
    "chat data": {"messages"},
    "chat data (ShareGPT-style)": {"conversations"},
    "dialogue data (DailyDialog-style)": {"dialog"},
    "prompt/response data": {"prompt", "response"},
    "prompt/completion data": {"prompt", "completion"},
}
RETRIEVAL_FIELDS = {"ctxs", "retrieved", "retrieved_passages", "retrieved_docs", "retrieved_contexts", "documents"}
INSTRUCTION_HUB_DATASETS = {
    "tatsu-lab/alpaca", "yahma/alpaca-cleaned", "rajpurkar/squad", "rajpurkar/squad_v2", "squad", "squad_v2",
    "li2017dailydialog/daily_dialog", "daily_dialog", "roskoN/dailydialog",
}
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


class RuleViolation(ValueError):
    """A config or input that breaks one of the user's hard rules."""


def refuse_retrieval_fields(record: dict, source: str) -> None:
    found = RETRIEVAL_FIELDS & set(record)
    if found:
        raise RuleViolation(
            f"{source} has retrieval fields ({', '.join(sorted(found))}): retrieval (RAG) data is never mixed into training."
        )


def check_plain_text_record(record: dict, source: str) -> None:
    """Refuse a phase-1 record that is instruction, Q&A, dialogue or retrieval data."""
    refuse_retrieval_fields(record, source)
    keys = set(record)
    for kind, fields in INSTRUCTION_SCHEMAS.items():
        if fields <= keys:
            raise RuleViolation(f"{source} looks like {kind}; phase 1 trains on plain text only (no instruction data).")
    if "data" in keys and isinstance(record["data"], list) and any(
        isinstance(item, dict) and "paragraphs" in item for item in record["data"][:5]
    ):
        raise RuleViolation(f"{source} is a SQuAD file; phase 1 trains on plain text only (no instruction data).")
    text = record.get("text")
    if isinstance(text, str):
        check_plain_text(text, source)


def check_plain_text(text: str, source: str) -> None:
    """Refuse text that carries an instruction or dialogue format (Alpaca's prompt, DailyDialog's turn marks)."""
    if "### Instruction:" in text and "### Response:" in text:
        raise RuleViolation(f"{source} holds Alpaca-formatted instruction text; phase 1 trains on plain text only (no instruction data).")
    if text.count("__eou__") >= 2:
        raise RuleViolation(f"{source} is DailyDialog text; phase 1 trains on plain text only (no dialogue data).")


def check_plain_text_hub_dataset(name: str) -> None:
    if name.lower() in INSTRUCTION_HUB_DATASETS or any(word in name.lower() for word in ("alpaca", "squad", "dialog")):
        raise RuleViolation(f"dataset {name} is instruction/Q&A/dialogue data; phase 1 trains on plain text only.")


def check_no_retrieval_settings(settings: dict) -> None:
    for key, value in settings.items():
        if value and any(word in key.lower() for word in ("retriev", "rag_")):
            raise RuleViolation(f"setting {key} asks for retrieval data; retrieval (RAG) data is never mixed into training.")


def check_tokenizer(tokenizer_name: str | None) -> None:
    if tokenizer_name not in (None, "gpt2", "openai-community/gpt2"):
        raise RuleViolation(
            f"tokenizer_name={tokenizer_name!r}: this project uses the GPT-2 tokenizer only, never another or a retrained one."
        )


def check_random_init(model_name_or_path: str | None, config_name: str | None) -> None:
    """Phase 1 starts from random weights: refuse anything that would load a checkpoint."""
    if model_name_or_path:
        raise RuleViolation(
            f"model_name_or_path={model_name_or_path!r}: phase 1 trains from random weights; "
            "give a model shape with config_name (e.g. configs/gpt2-tiny.json) instead."
        )
    if config_name:
        path = Path(config_name)
        folder = path if path.is_dir() else path.parent
        if path.is_dir() and any((folder / name).exists() for name in WEIGHT_FILES):
            raise RuleViolation(
                f"config_name={config_name!r} is a model directory with weights; phase 1 takes a config file only."
            )


def check_epochs(phase: str, num_train_epochs: float) -> None:
    cap = MAX_EPOCHS[phase]
    if num_train_epochs > cap:
        raise RuleViolation(f"num_train_epochs={num_train_epochs:g}: {phase} is capped at {cap} epochs.")


def check_step_budget(phase: str, max_steps: int, examples_per_step: int, train_examples: int) -> None:
    """With `max_steps` set, the steps must not add up to more than the epoch cap."""
    cap = MAX_EPOCHS[phase]
    if max_steps > 0 and train_examples > 0 and max_steps * examples_per_step > cap * train_examples:
        epochs = max_steps * examples_per_step / train_examples
        raise RuleViolation(
            f"max_steps={max_steps} is {epochs:.2f} epochs of {train_examples:,} examples; {phase} is capped at {cap} epochs."
        )


def check_device(use_cpu: bool, precision: str, cpu_bf16_flags: list[str]) -> None:
    """Half precision on the CPU only where it is fast: bf16 on CPUs with bf16 instructions, fp16 never."""
    if use_cpu and precision == "fp16":
        raise RuleViolation("fp16 was asked for on the CPU, where it is much slower than fp32; "
                            "use precision: auto (bf16 where the CPU has bf16 units), or use_cpu: false for a GPU.")
    if use_cpu and precision == "bf16" and not cpu_bf16_flags:
        raise RuleViolation(
            "bf16 was asked for on a CPU without bf16 instructions (AVX512-BF16, AMX or Arm BF16), where it runs "
            "~100x slower than fp32; use precision: fp32 or auto, or use_cpu: false for a GPU."
        )
