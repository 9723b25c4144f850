"""audiomaepp: AudioMAE++ masked autoencoders for audio in JAX/Flax."""
import setuptools

setuptools.setup(
    name="audiomaepp",
    version="0.1.0",
    description="AudioMAE++: masked autoencoders with transformer++ blocks for audio, in JAX/Flax.",
    packages=setuptools.find_packages(include=["audiomaepp", "audiomaepp.*"]),
    package_data={"audiomaepp": ["evaluation/data/*.json"]},
    python_requires=">=3.10",
    install_requires=[
        "absl-py", "array_record", "chex", "etils", "flax", "grain", "jax", "librosa",
        "matplotlib", "ml_collections", "numpy", "optax", "orbax-checkpoint", "scikit-learn",
        "safetensors", "scipy", "soundfile", "soxr", "tensorboardX", "tensorflow-datasets", "tqdm",
    ],
    extras_require={
        # Only for original PyTorch `.pth` checkpoints: reading (import_original), writing (export).
        "torch": ["torch"],
        "test": ["pytest", "pytest-timeout"],
    },
)
