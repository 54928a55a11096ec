"""The refuse_choice component."""
