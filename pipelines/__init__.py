"""KFP pipelines of preftune."""
