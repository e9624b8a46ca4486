"""PostgreSQL as the system of record: schema, bulk loading and the feature store."""
