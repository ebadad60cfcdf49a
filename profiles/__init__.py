"""Model profiles (data): one TOML file per model, installed as granite_cli.profiles."""
