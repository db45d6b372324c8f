"""The engine: encoders, image loading, exact k-NN, parquet store, mining semantics."""
