"""The OpenAI-compatible HTTP server behind ``kvflow serve`` (see server.py)."""
