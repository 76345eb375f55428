"""trioproxy: an Ollama- and OpenAI-compatible proxy on Trio, with metrics operators can trust."""

__version__ = "0.1.0"
