"""coopipe command line (placeholder, filled in below)."""
def main() -> None:
    pass
