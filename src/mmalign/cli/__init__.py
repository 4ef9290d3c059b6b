"""Thin ``mmalign`` subcommands: parse arguments, call one library function."""
