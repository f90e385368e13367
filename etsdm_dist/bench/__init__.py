"""`etsdm bench NAME`: benchmarks that print figures (ratios side by side in one run), importable
from an installed package. Each module has `main(argv) -> int`."""
NAMES = ("loader", "train", "eval", "scan")
