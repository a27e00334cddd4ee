"""Real-server test infrastructure: moto, fake-gcs-server, Azurite, fault proxy."""
