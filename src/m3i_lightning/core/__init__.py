"""Pure torch: errors, the encoder contract, view names, process groups and row shares, seeds,
position tables. Everything else in the package may import it; it imports nothing of the package
above it."""
