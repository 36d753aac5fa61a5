"""Coverage-guided fuzzing (atheris) of the engine's input surfaces: one ``target_*.py``
module per surface, one driver (``python -m tests.fuzz.run``); see README.md here."""
