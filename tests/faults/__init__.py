"""Issue 7: faults injected, bad input refused, weights and credentials kept safe (tests/faults/)."""
