"""The champion component."""
