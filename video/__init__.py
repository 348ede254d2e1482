"""winnow: video."""
