"""bond_jax: BOND / J-BOND (Best-of-N distillation) RLHF in JAX/Flax."""

import pathlib

from setuptools import find_packages, setup


def _requirements(name):
  lines = pathlib.Path(__file__).with_name(name).read_text().splitlines()
  return [
      line.split("#")[0].strip() for line in lines if line.split("#")[0].strip() and not line.startswith("-r")
  ]


setup(
    name="bond_jax",
    version="0.1.0",
    description="Best-of-N distillation (BOND, J-BOND) for LLM alignment on TPU/GPU meshes, in JAX/Flax",
    packages=find_packages(include=["bond_jax", "bond_jax.*"]),
    python_requires=">=3.11",
    install_requires=_requirements("requirements.txt"),
    extras_require={"test": _requirements("requirements-test.txt")},
)
