"""KFP components of preftune, one sub-package each."""
