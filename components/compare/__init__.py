"""The compare component."""
