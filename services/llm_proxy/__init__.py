"""llm_proxy: the one service that talks to OpenAI-compatible model servers."""
