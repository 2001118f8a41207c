"""levels stage."""
