"""gateway: the public API (auth, tenants, validation, event watch)."""
