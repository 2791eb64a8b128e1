"""Learners (one model or many stacked), flat parameter vectors and merge rules."""
