"""AudioMAE++: self-supervised audio representations from masked autoencoders (JAX/Flax)."""

__version__ = "0.1.0"
