"""Few-shot domain adaptation: one domain (fast.py), many in parallel on Ray (parallel.py)."""
