"""The DIMSE application entity: C-ECHO, C-STORE, C-FIND, C-MOVE and C-GET SCP; C-STORE SCU."""
