"""Package map: the repository keeps tasks/, kernels/, configs/ and checkpoints/ at the top level, but they
install under the single public namespace ``zoo`` (top-level ``tasks``/``kernels`` would clash with PyPI).
checkpoints/ (a few MB of safetensors + config.json + model cards) installs as package data ``zoo/checkpoints``
so that ``zoo.create_model(name, pretrained=True)`` works from a wheel as well as from the source tree."""
from pathlib import Path

from setuptools import find_packages, setup

ROOTS = {"zoo": "zoo", "zoo.tasks": "tasks", "zoo.kernels": "kernels", "zoo.configs": "configs",
         "zoo.checkpoints": "checkpoints"}
CHECKPOINT_FILES = ["model.safetensors", "config.json", "README.md", "*.png"]


def _packages():
    packages, package_dir = [], {}
    for name, directory in ROOTS.items():
        packages.append(name)
        package_dir[name] = directory
        for sub in find_packages(directory):
            packages.append(f"{name}.{sub}")
            package_dir[f"{name}.{sub}"] = f"{directory}/{sub.replace('.', '/')}"
    package_data = {"zoo.configs": ["**/*.yaml"]}
    # each checkpoint directory is a data-only package (listed, so setuptools installs it without warnings)
    root = Path(__file__).resolve().parent / "checkpoints"
    for directory in sorted(root.iterdir()) if root.is_dir() else []:
        if (directory / "model.safetensors").is_file():
            name = f"zoo.checkpoints.{directory.name}"
            packages.append(name)
            package_dir[name] = f"checkpoints/{directory.name}"
            package_data[name] = CHECKPOINT_FILES
    return packages, package_dir, package_data


packages, package_dir, package_data = _packages()
setup(packages=packages, package_dir=package_dir, package_data=package_data)
