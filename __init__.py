"""Dimple: discrete-diffusion multimodal LLM on transformers 5.x."""
