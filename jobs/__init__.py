"""Thin entrypoints for `ray job submit` (and local runs): parse a config, log it, call the library."""
