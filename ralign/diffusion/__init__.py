"""The diffusion policy: pipeline parts with LoRA adapters, samplers that record log-probabilities, text encodings, cross-attention capture and the seeding rules."""
