"""`python run.py passwd USER`: set a user's password from the shell.

The password is read from the terminal (asked twice) or, when standard
input is not a terminal, from its first line, so scripts can pipe it in;
never from a flag, which would show in `ps`. A missing user is created.
Every token the user had is revoked.
"""
from __future__ import annotations

import argparse
import asyncio
import getpass
import os
import sys
from typing import Sequence

from . import store
from .auth import Auth
from .settings import Settings


def _read_password() -> str:
    if not sys.stdin.isatty():
        return sys.stdin.readline().rstrip("\r\n")
    first = getpass.getpass("New password: ")
    if getpass.getpass("Again: ") != first:
        raise ValueError("the passwords differ")
    return first


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="aivonx passwd",
                                     description="Set a user's password (creating the user).")
    parser.add_argument("username")
    parser.add_argument("--db", default=os.environ.get("AIVONX_DB") or Settings().db,
                        help="SQLite database path or postgresql:// URL (AIVONX_DB, default ./aivonx.db)")
    args = parser.parse_args(argv)
    try:
        password = _read_password()
        db = store.open_database(args.db, store.PATIENT_BUSY_TIMEOUT_MS)
        try:
            created = asyncio.run(Auth().set_password(args.username, password))
        finally:
            store.close_database(db)
    except (ValueError, KeyboardInterrupt, EOFError, store.StoreError) as exc:
        print(f"aivonx passwd: {exc or 'cancelled'}", file=sys.stderr)
        return 1
    print(f"{'created user' if created else 'password changed for'} {args.username}")
    return 0
