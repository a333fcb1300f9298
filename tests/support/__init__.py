"""Helpers the test folders share: import them from here (``from tests.support.dcmtk import
dcmtk``). Fixtures stay in the ``conftest.py`` of the folder that uses them (the root one for what
every folder uses); no test imports a ``conftest`` module, which pytest loads under its own name
and would load a second time."""
