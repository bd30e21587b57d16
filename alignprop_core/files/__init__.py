"""Files: output names checked before any work and written atomically, readable load errors, and prompt lists."""
