"""Command-line entry points: thin wrappers over the library (each module has `main(argv)`)."""
