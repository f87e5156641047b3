"""Built-in backends, one module each; importing this package registers them all."""
