"""Small helpers on sequences."""

from seqkit.sequences import chunk, fibonacci, run_length_encode, running_total

__all__ = ["chunk", "fibonacci", "run_length_encode", "running_total"]
