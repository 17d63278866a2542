"""executor: runs a session's turns (the agent loop)."""
