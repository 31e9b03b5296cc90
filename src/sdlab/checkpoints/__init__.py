"""Reading, writing, detecting and converting checkpoint files. Imports `families`, `models`, `utils`."""
