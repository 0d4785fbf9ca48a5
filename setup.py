"""hpckd: distributed, HPC-scale knowledge distillation for data-augmentation studies."""
from setuptools import find_packages, setup

setup(
    name="hpckd",
    version="0.1.0",
    description="Distributed knowledge distillation for data-augmentation studies (DALI, DDP, DeepSpeed, SLURM)",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["hpckd", "hpckd.*"]),
    package_data={"hpckd": ["configs/*.yaml"]},
    python_requires=">=3.10",
    # Ranges; the tested pins are in constraints.txt. torch/torchvision must also work with the
    # 2.11/0.26 found on the GPU machines. The CPU-only torch wheel breaks torchvision, so the
    # Makefile installs the registry's (CUDA) builds, which run on CPU too.
    install_requires=[
        "torch>=2.11,<2.16",
        "torchvision>=0.26,<0.31",
        "numpy>=1.24",
        "omegaconf>=2.3,<2.5",
        "tqdm>=4.60",
        "matplotlib>=3.7",
        "scipy>=1.10",
        "pandas>=2.1",  # hpckd.report: tables over seeds (DataFrame.map: 2.1)
        "tabulate>=0.9",  # pandas.DataFrame.to_markdown in hpckd.report
        "scikit-learn>=1.3",  # metrics.mi_knn: the attention study's nearest-neighbour MI (mutual_info_classif)
        "submitit>=1.5",
        "pillow>=10",
        "timm>=1.0,<1.1",  # ImageNet archs of the response-based study (hpckd.models.timm_nets)
    ],
    extras_require={
        "dali": ["nvidia-dali-cuda120>=1.40"],
        "deepspeed": ["deepspeed>=0.15"],
        "mpi": ["mpi4py>=3.1"],
        "test": ["pytest>=7", "scikit-learn>=1.3", "tensorboard>=2.17", "ruff>=0.6"],  # tensorboard: train.tensorboard=true
    },
    entry_points={"console_scripts": ["hpckd=hpckd.cli:main"]},
)
