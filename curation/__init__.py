"""winnow: curation."""
