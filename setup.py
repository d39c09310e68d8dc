"""Maps the repository's top-level folders onto the one `blip2_triton` import namespace.

export/, client/ and benchmarks/ stay at the top of the repository where users look for them, but
install as blip2_triton.export, blip2_triton.client and blip2_triton.benchmarks, so that no bare
`export` or `client` module lands in site-packages. pyproject.toml holds everything else.
"""
from setuptools import find_packages, setup

ROOTS = {
    "blip2_triton": "src/blip2_triton",
    "blip2_triton.export": "export",
    "blip2_triton.client": "client",
    "blip2_triton.benchmarks": "benchmarks",
    "blip2_triton.model_repository": "model_repository",
}

packages = []
for name, path in ROOTS.items():
    packages.append(name)
    packages += [f"{name}.{sub}" for sub in find_packages(path)]

setup(packages=packages, package_dir=ROOTS)
