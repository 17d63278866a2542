"""Traces (`tracing`), Prometheus metrics (`metrics`) and store instrumentation
(`stores`): what an operator sees of threadline from outside its logs and events."""
