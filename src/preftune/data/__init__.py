"""Data readers, ingest and preference import, validation."""
