"""Key management: KEK providers and the keyring of wrapped per-column DEKs."""
