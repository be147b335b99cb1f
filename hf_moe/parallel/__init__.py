"""Expert parallelism over process groups that accelerate manages."""
