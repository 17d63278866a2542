"""The session service: the append-only, hash-chained conversation log and context building."""
