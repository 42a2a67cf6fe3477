"""Model profiles (*.toml), shipped inside the package as zolite.profiles."""
