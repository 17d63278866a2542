"""Turns: the agent loop of one conversation turn, its tools, workspace and lease."""
