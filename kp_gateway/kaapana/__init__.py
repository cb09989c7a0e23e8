"""The document format users rely on (Kaapana's series documents and their vocabulary) and the
routing record; pure, no I/O."""
