"""Formatting kept trajectories into training data: templates, chat templates, tokenization, exports, audit, the Hub."""
