"""audiomaepp: AudioMAE++ masked autoencoders for audio in JAX/Flax."""
import setuptools

setuptools.setup(
    name="audiomaepp",
    version="0.1.0",
    description="AudioMAE++: masked autoencoders with transformer++ blocks for audio, in JAX/Flax.",
    packages=setuptools.find_packages(include=["audiomaepp", "audiomaepp.*"]),
    package_data={"audiomaepp": ["evaluation/data/*.json"]},
    license="MIT",
    python_requires=">=3.10",
    install_requires=[
        "absl-py", "array_record", "chex", "etils", "flax", "grain", "jax", "librosa",
        "matplotlib", "ml_collections", "numpy", "optax", "orbax-checkpoint", "scikit-learn",
        "safetensors", "scipy", "soundfile", "soxr", "tensorboardX", "tensorflow-datasets", "tqdm",
    ],
    extras_require={
        # Reading and writing original PyTorch `.pth` checkpoints (import_original, export), and running the
        # original model code in the parity tests and benchmarks (pins of requirements-torch.txt).
        "torch": ["torch==2.13.0", "einops==0.8.2", "rotary-embedding-torch==0.9.1"],
        "test": ["pytest", "pytest-timeout"],
    },
)
