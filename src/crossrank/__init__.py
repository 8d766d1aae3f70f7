"""crossrank: distill a cross-encoder re-ranker from human relevance labels and serve it."""

__version__ = "0.1.0"
