"""The C-STORE SCP and its receive path: everything that runs on pynetdicom's association and
DUL threads (see each module's docstring)."""
