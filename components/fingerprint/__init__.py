"""The fingerprint component."""
