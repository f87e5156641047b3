"""Seeing what the compiler did: graph pictures, the HTML report, Model Explorer."""
