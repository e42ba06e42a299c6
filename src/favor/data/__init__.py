"""Data sources: the embedded stdlib corpus, text and FASTA files (corpus.py), ListOps (listops.py)."""
