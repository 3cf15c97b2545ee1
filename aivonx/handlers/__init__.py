"""Thin RequestHandlers, one module per interface."""
