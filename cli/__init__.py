"""The `loopstream` command line: commands parse, call a function that returns a result, print it."""
