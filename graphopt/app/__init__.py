"""The product around the compiler: command line, demo, example models, model references."""
