#!/usr/bin/env python3
"""Build dist/aivonx.pyz: Aivonx, its dependencies, templates and static
files (the status page, Swagger UI and ReDoc) in one file that runs with
`python3 aivonx.pyz` wherever Python 3.11+ runs.

    python scripts/build_zipapp.py [--output dist/aivonx.pyz]

The zipapp is built with shiv: on its first start it unpacks itself once
into ~/.shiv (or $SHIV_ROOT) and imports from there, so templates and static
files are ordinary files beside the package. Compiled speedups (uvloop,
tornado's and PyYAML's C parts) are those of the building machine; where
they do not load, the pure-Python fallbacks run.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IGNORE = shutil.ignore_patterns("__pycache__", "*.pyc")


def stage(site_packages: str) -> None:
    """Dependencies from requirements.txt, the package, and its assets in
    aivonx/assets/ (where aivonx.app looks first)."""
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet",
                    "--disable-pip-version-check", "--no-compile", "--target", site_packages,
                    "-r", os.path.join(ROOT, "requirements.txt")], check=True)
    package = os.path.join(site_packages, "aivonx")
    shutil.copytree(os.path.join(ROOT, "aivonx"), package, ignore=IGNORE)
    for folder in ("templates", "static"):
        shutil.copytree(os.path.join(ROOT, folder), os.path.join(package, "assets", folder),
                        ignore=IGNORE)


def build(output: str) -> str:
    output = os.path.abspath(output)
    os.makedirs(os.path.dirname(output), exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="aivonx-build-") as tmp:
        site_packages = os.path.join(tmp, "site-packages")
        stage(site_packages)
        subprocess.run([sys.executable, "-m", "shiv", "--site-packages", site_packages,
                        "--entry-point", "aivonx.cli:main", "--output-file", output,
                        "--python", "/usr/bin/env python3", "--compressed",
                        "--reproducible"], check=True)
    return output


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", default=os.path.join(ROOT, "dist", "aivonx.pyz"),
                        help="where to write the zipapp (default dist/aivonx.pyz)")
    path = build(parser.parse_args().output)
    print(f"built {path} ({os.path.getsize(path) / 1e6:.1f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
