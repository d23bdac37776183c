"""End-to-end products the commands call: ``quickstart``, ``reproduce`` (stages) and the
invertibility ``validation`` experiment."""
