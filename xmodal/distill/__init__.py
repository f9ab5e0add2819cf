"""Distillation: smaller students made from trained teachers."""
