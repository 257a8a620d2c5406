"""wsi stage."""
