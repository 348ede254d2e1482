"""winnow: jobs."""
