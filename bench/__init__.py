"""Benchmarks: SYN-flood absorption and legitimate traffic, contender by contender (issue 9)."""
