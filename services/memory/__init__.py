"""memory: folds old messages into long-term memory the executor recalls."""
