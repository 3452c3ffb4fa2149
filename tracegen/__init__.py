"""tracegen: turn a strong teacher model into training data, and then into a small student."""

__version__ = "0.1.0"
