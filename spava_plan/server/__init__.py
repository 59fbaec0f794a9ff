"""spava-serve: the OpenAI-compatible HTTP server over a Session (the optional serve extra)."""
