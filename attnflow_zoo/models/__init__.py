"""One architecture per file; importing this package registers every preset."""
