"""Performer models: :class:`PerformerConfig`, :class:`PerformerLM` (causal, with O(1)-per-token
generation), :class:`PerformerEncoder` (bidirectional, masked-LM head), :class:`PerformerClassifier`."""

from .config import PerformerConfig
from .performer import POOLINGS, PerformerBlock, PerformerClassifier, PerformerEncoder, PerformerLM

__all__ = [
    "POOLINGS",
    "PerformerBlock",
    "PerformerClassifier",
    "PerformerConfig",
    "PerformerEncoder",
    "PerformerLM",
]
