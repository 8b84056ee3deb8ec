"""Event webhooks: the public events (catalog), the outbox every change writes them to in its own transaction,
subscriptions and the one sender that delivers them (signed, retried), alert rules' own URLs included."""
