"""LAPO models as plain torch modules (no Ray)."""

from lapo_ray.models.idm import IDM
from lapo_ray.models.impala import ImpalaCNN, frames_to_input, stack_frames
from lapo_ray.models.lapo import LatentDynamics, Models, build_models, num_params
from lapo_ray.models.policy import FrameEncoder, LatentPolicy
from lapo_ray.models.supervised_idm import SupervisedIDM, action_loss
from lapo_ray.models.vq import VQEmbeddingEMA
from lapo_ray.models.world_model import WorldModel

__all__ = [
    "IDM",
    "FrameEncoder",
    "ImpalaCNN",
    "LatentDynamics",
    "LatentPolicy",
    "Models",
    "SupervisedIDM",
    "VQEmbeddingEMA",
    "WorldModel",
    "action_loss",
    "build_models",
    "frames_to_input",
    "num_params",
    "stack_frames",
]
