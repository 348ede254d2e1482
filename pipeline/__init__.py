"""winnow: pipeline."""
