"""The online_dpo component."""
