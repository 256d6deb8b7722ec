"""Model registry: versions, gated and signed TFLite variants, downloads."""

from controlplane.models.controller import DownloadController, ModelController
from controlplane.models.service import ModelService

__all__ = ["DownloadController", "ModelController", "ModelService"]
