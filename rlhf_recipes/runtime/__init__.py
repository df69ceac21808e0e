"""The machinery of a run: its directory (rundir.py), checkpoints (checkpoint.py), several
processes (distributed.py), what it checks before it starts (startup.py) and how it stops
(stopping.py)."""
