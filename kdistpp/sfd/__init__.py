"""SFD: Simple and Fast Distillation of few-step students (Zhou et al., NeurIPS 2024).

    trainer = SFDTrainer(student, teacher, SFDConfig(num_steps=4), shape=(4, 64, 64))
    trainer.fit()
    x = sample_sfd(student, torch.randn(1, 4, 64, 64) * trainer.config.sigma_max, trainer.config)

A flow (rectified-flow) teacher: `FlowAsVE`, `sample_sfd_flow` (kdistpp.sfd.flow). diffusers UNets and
SD3/Flux transformers as students: `UNetStudent`, `FlowTransformerStudent`; LoRA students: `add_lora`,
`LoRATeacher` (kdistpp.sfd.lora); files the hosts load: kdistpp.sfd.export; one-step students:
`second_stage`; the command line: `python -m kdistpp.sfd`. See docs/sfd.md.
"""

from .conditioning import StepEmbedding, sinusoidal_embedding
from .flow import FlowAsVE, flow_timestamps, sample_sfd_flow, sfd_flow_denoiser
from .lora import LoRATeacher, add_lora
from .nets import MLPDenoiser, train_dsm
from .networks import CFGTeacher, FlowTransformerStudent, UNetStudent
from .sampling import AnalyticFirstStep, sample_sfd, sfd_denoiser
from .second_stage import second_stage
from .trainer import SFDConfig, SFDTrainer
from .trajectory import analytic_denoised, dpmpp_3m_trajectory, euler_step, euler_trajectory, multistep_update, nested_grid, polynomial_sigmas

__all__ = [
    "AnalyticFirstStep",
    "CFGTeacher",
    "FlowAsVE",
    "FlowTransformerStudent",
    "LoRATeacher",
    "MLPDenoiser",
    "SFDConfig",
    "SFDTrainer",
    "StepEmbedding",
    "UNetStudent",
    "add_lora",
    "analytic_denoised",
    "dpmpp_3m_trajectory",
    "euler_step",
    "euler_trajectory",
    "flow_timestamps",
    "multistep_update",
    "nested_grid",
    "polynomial_sigmas",
    "sample_sfd",
    "sample_sfd_flow",
    "second_stage",
    "sfd_denoiser",
    "sfd_flow_denoiser",
    "sinusoidal_embedding",
    "train_dsm",
]
