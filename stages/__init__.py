"""DVC stage scripts: file I/O around coopipe library calls (one pure function + main() each)."""
