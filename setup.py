"""Installs the aivonx package and the `aivonx` command (same as run.py)."""
from setuptools import find_packages, setup

with open("requirements.txt", encoding="utf-8") as f:
    requirements = [line.strip() for line in f
                    if line.strip() and not line.startswith("#")]

setup(
    name="aivonx",
    version="0.1.0",
    description="A load-balancing reverse proxy for Ollama",
    packages=find_packages(include=["aivonx", "aivonx.*"]),
    python_requires=">=3.11",
    install_requires=requirements,
    entry_points={"console_scripts": ["aivonx = aivonx.cli:main"]},
)
