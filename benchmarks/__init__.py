"""medft's benchmarks: run on demand, not installed with the package."""
