"""Adapters for the places people generate images: diffusers, ComfyUI, the A1111/Forge webui."""
