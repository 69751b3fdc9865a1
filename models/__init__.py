"""Model construction (`models.gpt2`): stock GPT-2 shapes from `configs/`, and the fast training loss."""
