"""Installs the aivonx package and the `aivonx` command (same as run.py)."""
import os

from setuptools import find_packages, setup


def asset_files(top: str) -> list[tuple[str, list[str]]]:
    """templates/ and static/ go to <prefix>/share/aivonx, where the app
    looks for them when it does not run from a checkout."""
    found = []
    for folder, _, files in os.walk(top):
        if files:
            found.append((os.path.join("share", "aivonx", folder),
                          [os.path.join(folder, f) for f in sorted(files)]))
    return found


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
    data_files=asset_files("templates") + asset_files("static"),
    entry_points={"console_scripts": ["aivonx = aivonx.cli:main"]},
)
