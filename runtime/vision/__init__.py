"""The vision tower: where a model keeps it, the frame-parallel encoder, its bounded
activations (chunking) and its kernels."""
