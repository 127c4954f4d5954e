"""Rollout servers (one HTTP protocol, a vLLM and a transformers back end) and their client."""
