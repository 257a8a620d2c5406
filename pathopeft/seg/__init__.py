"""seg stage."""
