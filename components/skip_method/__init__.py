"""The skip_method component."""
