"""`ralign bench`: where the time and memory go (pipeline stages, direct-backprop memory versus K, scaling across
Ray nodes). Every benchmark writes one JSON with the machine it ran on; timings live here, never in tests."""
