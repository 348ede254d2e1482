"""winnow: training."""
