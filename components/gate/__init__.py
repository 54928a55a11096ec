"""The gate component."""
