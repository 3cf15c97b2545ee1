"""Aivonx: a load-balancing reverse proxy for Ollama."""
