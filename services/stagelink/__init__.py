"""The PP transport: persistent UCX endpoints that carry activations from stage k to k+1
(header + raw tensor bytes; CUDA tensors travel as they are where UCX has CUDA transports)."""

from services.stagelink.errors import StageLinkError
from services.stagelink.link import StageLink
from services.stagelink.wire import ActivationHeader

__all__ = ["ActivationHeader", "StageLink", "StageLinkError"]
