"""The promote and champion components."""
