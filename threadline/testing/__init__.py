"""Test infrastructure shared by the unit, service and e2e suites and the benchmarks."""
