"""The one prompt format, shared by training, generation, chat and evaluation.

Design decisions:
- Plain text over the unchanged GPT-2 tokenizer, no new special tokens:

      [system text]\\n                      (optional, first message only)
      User: {user text}\\n
      Assistant: {reply}<|endoftext|>
      User: ...\\n
      Assistant:                           <- generation prompt; the model writes " {reply}<|endoftext|>"

- Every assistant reply ends with `<|endoftext|>`, so the model learns to stop by itself and
  generation stops on the tokenizer's EOS with no custom stopping rule.
- `render` is the reference implementation; `CHAT_TEMPLATE` is the same format as a Jinja chat template
  (and `ollama_template` as an Ollama Go template, for the Modelfile written beside a GGUF export),
  stored with every model so `tokenizer.apply_chat_template` reproduces it, message text trimmed alike,
  with `{% generation %}` marks on the replies so `return_assistant_tokens_mask` gives the tokens that
  carry the loss (a test checks text, ids and masks agree).
- `render` also returns the character spans of the assistant replies (the space after "Assistant:"
  through the closing `<|endoftext|>`); `data.sft` turns them into label masks via token offsets, so the
  tokens that carry the loss are exactly those that follow a generation prompt.
"""

from __future__ import annotations

from typing import Iterable

EOS = "<|endoftext|>"
USER_PREFIX = "User: "
ASSISTANT_PREFIX = "Assistant:"
ROLES = ("system", "user", "assistant")

CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}{{ message['content'] | trim + '\n' }}"
    "{%- elif message['role'] == 'user' -%}{{ 'User: ' + message['content'] | trim + '\n' }}"
    "{%- else -%}{{ 'Assistant:' }}{% generation %}{{ ' ' + message['content'] | trim + '<|endoftext|>' }}{% endgeneration %}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ 'Assistant:' }}{%- endif -%}"
)


def ollama_template() -> str:
    """The same format in Ollama's Go template syntax (a Modelfile's TEMPLATE), ending with the generation prompt.
    No `{{-` trim marks: they would eat the newlines the format needs."""
    return (
        "{{ range .Messages }}"
        '{{ if eq .Role "system" }}{{ .Content }}\n'
        '{{ else if eq .Role "user" }}' + USER_PREFIX + "{{ .Content }}\n"
        '{{ else if eq .Role "assistant" }}' + ASSISTANT_PREFIX + " {{ .Content }}" + EOS + "{{ end }}"
        "{{ end }}" + ASSISTANT_PREFIX
    )


def validate_messages(messages: Iterable[dict]) -> list[dict]:
    """Check roles and order; return the messages with stripped, non-empty content."""
    cleaned = []
    for position, message in enumerate(messages):
        role, content = message.get("role"), message.get("content")
        if role not in ROLES or not isinstance(content, str):
            raise ValueError(f"message {position} needs a role in {ROLES} and a text content, got {message!r}")
        if role == "system" and position != 0:
            raise ValueError("only the first message may be a system message")
        content = content.strip()
        if not content:
            raise ValueError(f"message {position} ({role}) is empty")
        cleaned.append({"role": role, "content": content})
    turns = [m["role"] for m in cleaned if m["role"] != "system"]
    if any(role != ("user" if i % 2 == 0 else "assistant") for i, role in enumerate(turns)):
        raise ValueError("turns must alternate user, assistant, user, ... starting with the user")
    return cleaned


def render(messages: Iterable[dict], add_generation_prompt: bool = False) -> tuple[str, list[tuple[int, int]]]:
    """Render a conversation; return the text and the (start, end) character spans of assistant replies."""
    parts: list[str] = []
    spans: list[tuple[int, int]] = []
    length = 0
    for message in validate_messages(messages):
        role, content = message["role"], message["content"]
        if role == "system":
            piece = content + "\n"
        elif role == "user":
            piece = USER_PREFIX + content + "\n"
        else:
            piece = f"{ASSISTANT_PREFIX} {content}{EOS}"
            spans.append((length + len(ASSISTANT_PREFIX), length + len(piece)))
        parts.append(piece)
        length += len(piece)
    if add_generation_prompt:
        parts.append(ASSISTANT_PREFIX)
    return "".join(parts), spans


def generation_prompt(messages: Iterable[dict]) -> str:
    """The text a model continues to produce the next assistant reply."""
    return render(messages, add_generation_prompt=True)[0]


# Reading comprehension (SQuAD) uses one fixed reply for questions the passage cannot answer (SQuAD v2.0),
# and a user-message layout that a model keeps in its config (`squad_layout`), so training, evaluation and
# grounded decoding lay a passage out the way that model learned it. `question_first` (the default since it
# won at full length, README) puts the question before the passage, so under causal attention the passage
# is read knowing the question, and repeats it after; `passage_first` is the original layout, which models
# tuned before the setting existed (no `squad_layout` in their config) were trained with.
NO_ANSWER_REPLY = "The passage does not contain the answer to this question."
PASSAGE_LABEL = "Passage: "
SQUAD_LAYOUTS = ("passage_first", "question_first")
DEFAULT_SQUAD_LAYOUT = "question_first"
UNRECORDED_SQUAD_LAYOUT = "passage_first"


# Two instructions, so the model can know when abstaining is allowed at all: SQuAD v1.1 questions (known to be
# answerable) get ANSWER_INSTRUCTION, SQuAD v2.0 questions and retrieved passages ABSTAIN_INSTRUCTION. A model
# tuned that way has `squad_abstain_instruction: true` in its config; older models saw ANSWER_INSTRUCTION always.
ANSWER_INSTRUCTION = "Answer the question using the passage."
ABSTAIN_INSTRUCTION = "Answer the question using the passage, or say that the passage does not contain the answer."


def reading_comprehension_message(passage: str, question: str, layout: str = DEFAULT_SQUAD_LAYOUT,
                                  instruction: str = ANSWER_INSTRUCTION) -> str:
    if layout not in SQUAD_LAYOUTS:
        raise ValueError(f"squad_layout must be one of {', '.join(SQUAD_LAYOUTS)}, got {layout!r}")
    body = f"{PASSAGE_LABEL}{passage.strip()}\n\nQuestion: {question.strip()}"
    if layout == "question_first":
        body = f"Question: {question.strip()}\n\n{body}"
    return f"{instruction}\n\n{body}"


def squad_instruction_of(model, may_abstain: bool) -> str:
    """The instruction `model` learned for a question that may (v2.0, retrieval) or may not (v1.1) lack an answer."""
    return ABSTAIN_INSTRUCTION if may_abstain and getattr(model.config, "squad_abstain_instruction", False) else ANSWER_INSTRUCTION


def squad_layout_of(model) -> str:
    """The reading-comprehension layout `model` was tuned with (models from before the setting: `passage_first`)."""
    return getattr(model.config, "squad_layout", UNRECORDED_SQUAD_LAYOUT)
