"""The kto component."""
