"""The intermediate representation passes work on: canonical ops, graphs, shapes, purity."""
