"""Adapters that plug adams_dist optimizers into training frameworks; each imports its framework itself."""
