"""Model operations across the cluster, one service: ModelOps.

fanout.py sends one request to each of several nodes and keeps each
node's result; progress.py merges their progress lines into one Ollama
stream; blobs.py streams one upload to every node at once; service.py
holds the policy (which nodes, what the outcome is).
"""
from .fanout import Cancel, FanOut, NodeResult
from .progress import ProgressMerger
from .service import (ModelOps, NoNodeAvailable, OpResult, UnknownModel, common_refusal,
                      failure_message, is_unload, keep_alive_is_zero)

__all__ = ["Cancel", "FanOut", "ModelOps", "NoNodeAvailable", "NodeResult", "OpResult",
           "ProgressMerger", "UnknownModel", "common_refusal", "failure_message", "is_unload",
           "keep_alive_is_zero"]
