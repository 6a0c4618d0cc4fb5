"""SFD: Simple and Fast Distillation of few-step students (Zhou et al., NeurIPS 2024).

    trainer = SFDTrainer(student, teacher, SFDConfig(num_steps=4), shape=(4, 64, 64))
    trainer.fit()
    x = sample_sfd(student, torch.randn(1, 4, 64, 64) * trainer.config.sigma_max, trainer.config)

A flow (rectified-flow) teacher: `FlowAsVE`, `sample_sfd_flow` (kdistpp.sfd.flow). See docs/sfd.md.
"""

from .conditioning import StepEmbedding, sinusoidal_embedding
from .flow import FlowAsVE, flow_timestamps, sample_sfd_flow, sfd_flow_denoiser
from .nets import MLPDenoiser, train_dsm
from .sampling import AnalyticFirstStep, sample_sfd, sfd_denoiser
from .trainer import SFDConfig, SFDTrainer
from .trajectory import analytic_denoised, dpmpp_3m_trajectory, euler_step, multistep_update, nested_grid, polynomial_sigmas

__all__ = [
    "AnalyticFirstStep",
    "FlowAsVE",
    "MLPDenoiser",
    "SFDConfig",
    "SFDTrainer",
    "StepEmbedding",
    "analytic_denoised",
    "dpmpp_3m_trajectory",
    "euler_step",
    "flow_timestamps",
    "multistep_update",
    "nested_grid",
    "polynomial_sigmas",
    "sample_sfd",
    "sample_sfd_flow",
    "sfd_denoiser",
    "sfd_flow_denoiser",
    "sinusoidal_embedding",
    "train_dsm",
]
