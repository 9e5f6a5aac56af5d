"""Named experiment recipes: each builds configs, runs them and returns one comparison table."""
