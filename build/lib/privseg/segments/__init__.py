"""The segment engine: a declarative segment language compiled to Polars, all segments in one pass."""
