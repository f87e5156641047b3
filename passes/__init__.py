"""Built-in passes, one module each; importing this package registers them all."""
