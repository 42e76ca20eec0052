"""Avro schemas (`*.avsc`): the single source of truth for every event.

`envelope.avsc` wraps every event; each event type has `<snake_name>.v<N>.avsc` per
schema version. Old versions stay here so that old sessions still decode.
"""
from pathlib import Path

SCHEMA_DIR = Path(__file__).parent
