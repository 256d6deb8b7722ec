"""The model pipeline: a trained model's weights → build → gate → sign → register → (deploy)."""

from controlplane.pipeline.service import ModelPipeline, burst_version, round_version

__all__ = ["ModelPipeline", "burst_version", "round_version"]
