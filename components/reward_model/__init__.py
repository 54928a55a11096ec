"""The reward_model component."""
