"""The database (engine, sessions, ORM models, migrations), the file store and ingest."""
