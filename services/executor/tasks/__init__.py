"""Background tasks: records and their store, the pool, the classifier and the runners."""
