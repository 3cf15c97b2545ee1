"""Test doubles for the servers Aivonx talks to."""
