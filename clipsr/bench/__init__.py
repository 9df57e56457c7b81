"""Benchmarks that print figures and write them to files, with the environment that produced them."""
