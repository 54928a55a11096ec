"""The preference_import component."""
