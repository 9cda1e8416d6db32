"""Worker plane: agent adapters, the assignment runner, grading and worker drivers."""
