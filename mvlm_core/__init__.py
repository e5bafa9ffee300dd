"""mvlm_core: the base both sides use: errors, atomic outputs, file types, the conversation template, llama.cpp runtime."""
