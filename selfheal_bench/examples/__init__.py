"""Example user models for "serve your own model": what a user brings, and the few lines they add."""
