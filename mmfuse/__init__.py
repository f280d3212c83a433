"""mmfuse: multimodal fusion served by NVIDIA Triton Inference Server."""
__version__ = "0.1.0"
