"""Ingestion: sources read, validated, generalized, pseudonymized at the door and stored."""
