#!/usr/bin/env python3
"""Run Aivonx: `python run.py --node http://gpu1:11434 --node http://gpu2:11434`."""
import sys

from aivonx.cli import main

if __name__ == "__main__":
    sys.exit(main())
