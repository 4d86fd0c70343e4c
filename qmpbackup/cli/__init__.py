"""The ``qmpbackup`` command line: argument parsing and printing, over the API and the
repository functions."""
