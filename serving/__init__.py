"""Model plane: serves model pairs behind an OpenAI-compatible API.

Embedded default: llama.cpp (llama-cpp-python's server) on CPU with the tiny GGUF from PyPI.
Production (issue 7): vLLM model pairs behind Ray Serve.
"""
