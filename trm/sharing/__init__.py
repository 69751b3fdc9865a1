"""A trained model leaves TRM here: the local chat server and its page, the Hub upload, the GGUF export for
llama.cpp and Ollama. Each takes a saved model directory and nothing else of the training."""
