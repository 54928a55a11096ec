"""The choose_methods component."""
