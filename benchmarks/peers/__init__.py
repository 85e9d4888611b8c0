"""The tools users would pick instead of batchtrack, set up as small as they go, for the
benchmarks to measure side by side with ours (peers, not dependencies)."""
