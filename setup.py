"""Package map: the repository keeps tasks/, kernels/ and configs/ at the top level, but they install
under the single public namespace ``zoo`` (top-level ``tasks``/``kernels`` would clash with PyPI)."""
from setuptools import find_packages, setup

ROOTS = {"zoo": "zoo", "zoo.tasks": "tasks", "zoo.kernels": "kernels", "zoo.configs": "configs"}


def _packages():
    packages, package_dir = [], {}
    for name, directory in ROOTS.items():
        packages.append(name)
        package_dir[name] = directory
        for sub in find_packages(directory):
            packages.append(f"{name}.{sub}")
            package_dir[f"{name}.{sub}"] = f"{directory}/{sub.replace('.', '/')}"
    return packages, package_dir


packages, package_dir = _packages()
setup(packages=packages, package_dir=package_dir, package_data={"zoo.configs": ["**/*.yaml"]})
