"""fastadv-jax: fast adversarial training (FGSM, FGSM-RS, Free-AT, PGD, GradAlign) in JAX/Flax."""
from setuptools import find_packages, setup

setup(
    name="fastadv_jax",
    version="0.1.0",
    description="Fast adversarial training and GradAlign in JAX/Flax",
    # The repository's configs/ is installed as fastadv_jax.configs, so config files import each
    # other (and the benchmark imports them) as a package, from any directory.
    packages=find_packages(include=["fastadv_jax", "fastadv_jax.*"]) + ["fastadv_jax.configs"],
    package_dir={"fastadv_jax.configs": "configs"},
    python_requires=">=3.11",
    # The exact versions the README's numbers come from are in requirements/ (scripts/lock.sh);
    # these ranges are for installing the library into an environment of one's own.
    install_requires=[
        # jaxlib 0.12.1: multi-process runs hang (distributed.BROKEN_MULTIPROCESS_JAXLIB)
        "jax>=0.10,!=0.12.1",
        "jaxlib>=0.10,!=0.12.1",
        "flax>=0.11",
        "optax>=0.2.4",
        "chex>=0.1.88",
        "ml_collections>=1.0",
        "orbax-checkpoint>=0.11",
        "absl-py>=2.0",
        "numpy>=1.26",
        "tensorflow-datasets>=4.9.7",
        "importlib_resources>=6.0",  # tfds 4.9.10 imports it without declaring it
        "tensorflow-cpu>=2.16",  # tfds needs TensorFlow to prepare and read image datasets
        "tensorboardX>=2.6",
        "tqdm>=4.66",
        "filelock>=3.12",  # JAX's compilation cache needs it for its size cap (compilation_cache.py)
        "matplotlib>=3.8",
    ],
    extras_require={
        "test": ["pytest>=8.0", "pytest-xdist>=3.5", "pdoc>=15.0"],
        "gpu": ["jax[cuda12]>=0.10"],
        "tpu": ["jax[tpu]>=0.10"],
        "bench": ["torch>=2.2", "psutil>=5.9"],
        "torch": ["torch>=2.2"],  # model.pt files (torch_export / torch_import); .npz needs none
    },
)
