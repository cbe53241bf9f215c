"""Helpers for training frameworks; each module imports its framework, so import the one you use."""
