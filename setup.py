"""Package layout that pyproject.toml cannot express: the model-card templates are kept in the top-level
`model_cards/` folder of the source tree and installed as package data of `conversions` (`conversions/model_cards/`),
so a wheel never adds a top-level `model_cards` folder to site-packages. Everything else is in pyproject.toml."""

from setuptools import find_namespace_packages, setup

setup(
    packages=[*find_namespace_packages(include=["hf_moe*", "conversions*"]), "conversions.model_cards"],
    package_dir={"conversions.model_cards": "model_cards"},
    package_data={"conversions.model_cards": ["*.md"]},
)
