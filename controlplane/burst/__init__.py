"""Burst training jobs (API: /api/v1/jobs): placement, Ray/local backends, monitoring; results are published
through controlplane.pipeline."""
