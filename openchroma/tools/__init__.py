"""User-facing tools: conformance checks, random checkpoints, benchmarks."""
