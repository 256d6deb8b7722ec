"""Burst training jobs: placement, Ray/local backends, monitoring, results into the model registry."""
